"""Refuse any network connection that does not go to loopback.

Used two ways:

- as a pytest plugin (register with ``pytest_plugins = ["network_guard"]`` in
  ``tests/conftest.py``): the guard is installed for the whole test session, fails the
  test that tried to leave loopback, and offers the module fixture ``loopback_only``;
- from a child process: ``import network_guard; network_guard.install()``.

A refused attempt raises ``NonLoopbackAccess`` (a ``RuntimeError``, so that retry
loops that catch ``OSError`` do not swallow it) and is remembered in ``ATTEMPTS``;
the plugin then fails the session at the end too, in case the error was caught.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["ATTEMPTS", "NonLoopbackAccess", "install", "uninstall"]

ATTEMPTS: list[str] = []
_ORIGINAL: dict = {}
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class NonLoopbackAccess(RuntimeError):
    """A test tried to reach something other than 127.0.0.1 / ::1."""


def _is_loopback(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host).strip("[]")
    if host in _LOOPBACK_NAMES or host == "":  # "" is the bind-to-any wildcard
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified  # 0.0.0.0 is this host


def _refuse(what: str):
    ATTEMPTS.append(what)
    raise NonLoopbackAccess(f"network access outside loopback refused in tests: {what}")


def _check_address(family, address):
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        if not _is_loopback(address[0]):
            _refuse(f"connect to {address[0]}:{address[1]}")


def install() -> None:
    """Patch ``socket`` so that only loopback hosts can be resolved or connected."""
    if _ORIGINAL:
        return
    _ORIGINAL["connect"] = socket.socket.connect
    _ORIGINAL["connect_ex"] = socket.socket.connect_ex
    _ORIGINAL["getaddrinfo"] = socket.getaddrinfo
    _ORIGINAL["create_connection"] = socket.create_connection

    def connect(self, address):
        _check_address(self.family, address)
        return _ORIGINAL["connect"](self, address)

    def connect_ex(self, address):
        _check_address(self.family, address)
        return _ORIGINAL["connect_ex"](self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            _refuse(f"resolve {host}")
        return _ORIGINAL["getaddrinfo"](host, *args, **kwargs)

    def create_connection(address, *args, **kwargs):
        if not _is_loopback(address[0]):
            _refuse(f"connect to {address[0]}:{address[1]}")
        return _ORIGINAL["create_connection"](address, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
    socket.create_connection = create_connection


def uninstall() -> None:
    """Undo :func:`install`."""
    if not _ORIGINAL:
        return
    socket.socket.connect = _ORIGINAL.pop("connect")
    socket.socket.connect_ex = _ORIGINAL.pop("connect_ex")
    socket.getaddrinfo = _ORIGINAL.pop("getaddrinfo")
    socket.create_connection = _ORIGINAL.pop("create_connection")


# -- pytest plugin hooks -------------------------------------------------------------
try:
    import pytest
except ImportError:  # a child process without pytest only uses install()
    pytest = None

if pytest is not None:

    @pytest.fixture(autouse=True)
    def _loopback_only_per_test():
        """Fail the test that tried to leave loopback, even if it caught the error."""
        before = len(ATTEMPTS)
        yield
        refused = ATTEMPTS[before:]
        if refused:
            pytest.fail("network access outside loopback: " + "; ".join(refused))

    @pytest.fixture(scope="module")
    def loopback_only():
        """Fail the module, at its end, if anything so far tried to leave loopback.

        The modules that talk to the archive servers ask for it with
        ``pytestmark = pytest.mark.usefixtures("loopback_only")``.
        """
        install()
        yield
        assert not ATTEMPTS, ATTEMPTS


def pytest_configure(config):
    install()


def pytest_unconfigure(config):
    uninstall()


def pytest_sessionfinish(session, exitstatus):
    if ATTEMPTS:
        session.exitstatus = 1
        print("\nnetwork_guard: refused non-loopback network access: " + "; ".join(ATTEMPTS))
