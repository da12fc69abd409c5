"""Fixtures of the end-to-end suite (helpers in e2e.py).

`daemon`: the default daemon, one per test module (a module's
`DAEMON_REORDER` dict, when it has one, adds keys to its [reorder]).
`make_daemon`: a test's own daemon with extra [server] keys, stopped at the
end of the test; its exit code must be 0 unless the test killed it.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from e2e import ENV_VARS, Daemon, required_path


def _finish(daemon: Daemon) -> None:
    code = daemon.stop()
    if not daemon.killed and not daemon.start_failed:
        assert code == 0, (
            f"contextpilotd exited with code {code} after SIGTERM (expected 0).\n"
            f"output:\n{daemon.output()[-4000:]}"
        )


@pytest.fixture(scope="session", autouse=True)
def _no_proxy_for_loopback():
    """httpx and the SDK honour HTTP(S)_PROXY; the daemon is on loopback."""
    for name in ("NO_PROXY", "no_proxy"):
        entries = [e for e in os.environ.get(name, "").split(",") if e]
        os.environ[name] = ",".join(entries + [h for h in ("127.0.0.1", "localhost") if h not in entries])
    yield


@pytest.fixture(scope="session")
def real_parts() -> dict[str, str]:
    """The daemon binary, llama-server and the model from the environment.
    A missing one makes every test that needs a daemon an error (at setup),
    never a skip."""
    return {name: str(required_path(name)) for name in ENV_VARS}


@pytest.fixture(scope="module")
def daemon(real_parts, tmp_path_factory, request) -> Daemon:
    """The default daemon, shared by the tests of one module."""
    d = Daemon(tmp_path_factory.mktemp("daemon"), reorder=getattr(request.module, "DAEMON_REORDER", None))
    try:
        d.start()
        yield d
    finally:
        _finish(d)


@pytest.fixture
def make_daemon(real_parts, tmp_path_factory):
    """Factory for a test's own daemon: `make_daemon(server={"api_key": "k"})`,
    `make_daemon(reorder={"quality": "balanced"})`.
    Each is started, and stopped (exit code 0 unless the test killed it) at
    the end of the test."""
    made: list[Daemon] = []

    def make(server: dict[str, Any] | None = None, start: bool = True,
             reorder: dict[str, Any] | None = None, llama: dict[str, Any] | None = None) -> Daemon:
        d = Daemon(tmp_path_factory.mktemp("daemon"), server=server, reorder=reorder, llama=llama)
        made.append(d)
        return d.start() if start else d

    yield make
    errors = []
    for d in made:
        try:
            _finish(d)
        except BaseException as e:  # stop every daemon before reporting
            errors.append(e)
    if errors:
        raise errors[0]


def pytest_report_header(config):
    lines = []
    for name in ENV_VARS:
        lines.append(f"{name}={os.environ.get(name, '<unset>')}")
    return lines
