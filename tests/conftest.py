"""Shared pytest configuration.

- ``network_guard``: any connection to a non-loopback address fails the test run
  (the test suite must never reach outside 127.0.0.1).
- ``slurm_cluster``: a real single-node Slurm, started on demand (tests/slurm_fixture.py).
"""

from slurm_fixture import slurm_cluster  # noqa: F401

pytest_plugins = ["network_guard"]
