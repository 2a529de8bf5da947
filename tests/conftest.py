"""Shared pytest configuration.

- ``network_guard``: any connection to a non-loopback address fails the test run
  (the test suite must never reach outside 127.0.0.1).
- ``slurm_cluster``: a real single-node Slurm, started on demand (tests/slurm_fixture.py).
- ``restore_streams``: for tests that run a workflow step in the test process (a step
  sends stdout, stderr and logging to its log file).
"""

import logging
import sys

import pytest
from slurm_fixture import slurm_cluster  # noqa: F401

pytest_plugins = ["network_guard"]


@pytest.fixture
def restore_streams():
    """Give back stdout, stderr and the logging handlers a step run here took over."""
    streams, handlers = (sys.stdout, sys.stderr), logging.getLogger().handlers[:]
    yield
    sys.stdout, sys.stderr = streams
    logging.getLogger().handlers[:] = handlers
