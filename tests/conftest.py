"""Shared pytest configuration.

- ``network_guard``: any connection to a non-loopback address fails the test run
  (the test suite must never reach outside 127.0.0.1); the modules that talk to the
  loopback archive servers also ask for its ``loopback_only`` fixture.
- ``program_dir``: the small test programme of ``archive_helpers`` as rate and cal files
  (a module that needs another programme defines its own ``program_dir``).
- ``slurm_cluster``: a real single-node Slurm, started on demand (tests/slurm_fixture.py).
- ``restore_streams``: for tests that run a workflow step in the test process (a step
  sends stdout, stderr and logging to its log file).
"""

import logging
import sys

import pytest
from archive_helpers import make_program
from slurm_fixture import slurm_cluster  # noqa: F401

pytest_plugins = ["network_guard"]


@pytest.fixture
def restore_streams():
    """Give back stdout, stderr and the logging handlers a step run here took over."""
    streams, handlers = (sys.stdout, sys.stderr), logging.getLogger().handlers[:]
    yield
    sys.stdout, sys.stderr = streams
    logging.getLogger().handlers[:] = handlers


@pytest.fixture(scope="module")
def program_dir(tmp_path_factory):
    """A folder with rate and cal files of every exposure in ``archive_helpers.EXPOSURES``."""
    directory = tmp_path_factory.mktemp("program")
    make_program(directory)
    return directory
