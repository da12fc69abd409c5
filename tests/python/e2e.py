"""Helpers of the end-to-end suite: `Daemon` runs the real contextpilotd binary
in front of the real llama-server and the real model (SmolLM2-135M-Instruct
Q4_1); conftest.py turns it into fixtures.

Run through `make test`, or by hand:

    PY=$(bash scripts/python-env.sh | tail -n 1)
    eval "$(bash scripts/provision.sh paths)"
    CONTEXTPILOTD_BIN=target/release/contextpilotd \\
    CONTEXTPILOTD_TEST_LLAMA_SERVER="$LLAMA_SERVER" CONTEXTPILOTD_TEST_MODEL="$MODEL" \\
      "$PY" -m pytest tests/python -q

A missing variable is an error of every test that needs a daemon, never a skip.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

MODEL_ALIAS = "smollm2"
# How long a daemon may take from exec to /health 200 (model load included).
START_TIMEOUT_S = 90.0
# How long a daemon may take to exit after SIGTERM before it is SIGKILLed.
STOP_TIMEOUT_S = 20.0

ENV_VARS = {
    "CONTEXTPILOTD_BIN": "the built daemon binary (e.g. target/release/contextpilotd)",
    "CONTEXTPILOTD_TEST_LLAMA_SERVER": "the real llama-server (`bash scripts/provision.sh paths` prints LLAMA_SERVER=...)",
    "CONTEXTPILOTD_TEST_MODEL": "the real model, SmolLM2-135M-Instruct Q4_1 (`bash scripts/provision.sh paths` prints MODEL=...)",
}


def required_path(name: str) -> Path:
    """The file named by environment variable `name`; raises (a test error,
    not a skip) when it is unset or does not name a file."""
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"environment variable {name} is not set: it must name {ENV_VARS[name]}. "
            "`make test` sets CONTEXTPILOTD_BIN, CONTEXTPILOTD_TEST_LLAMA_SERVER and "
            "CONTEXTPILOTD_TEST_MODEL.",
            pytrace=False,
        )
    path = Path(value)
    if not path.is_file():
        pytest.fail(f"{name}={value} does not name a file (it must name {ENV_VARS[name]})", pytrace=False)
    if name != "CONTEXTPILOTD_TEST_MODEL" and not os.access(path, os.X_OK):
        pytest.fail(f"{name}={value} is not executable", pytrace=False)
    return path.resolve()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(timeout_s: float, what: str, check: Callable[[], Any], interval_s: float = 0.05) -> Any:
    """Polls `check` until it returns something truthy and returns that; fails
    the test naming `what` when `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    """`response` has HTTP `status` and the OpenAI error body
    {"error": {"message": str, "type": str, "code": status}}; returns the error object."""
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url}: expected HTTP {status}, "
        f"got {response.status_code}: {response.text[:500]}"
    )
    try:
        body = response.json()
    except ValueError:
        pytest.fail(f"HTTP {status} body is not JSON: {response.text[:500]!r}")
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"not an OpenAI error body: {body!r}"
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"], f"error.message: {body!r}"
    assert isinstance(error.get("type"), str) and error["type"], f"error.type: {body!r}"
    assert error.get("code") == status and not isinstance(error.get("code"), bool), f"error.code != {status}: {body!r}"
    return error


class Daemon:
    """One `contextpilotd run` in a directory of its own.

    `server` adds keys to [server] (api_key, max_body_bytes, max_queue,
    queue_timeout_s, ...), `reorder` to [reorder] (quality, ...), `llama` to
    [llama] (child_key, ...). Nothing
    runs until `start()`.
    """

    def __init__(self, workdir: Path, server: dict[str, Any] | None = None,
                 reorder: dict[str, Any] | None = None, llama: dict[str, Any] | None = None):
        self.bin = required_path("CONTEXTPILOTD_BIN")
        self.llama_server = required_path("CONTEXTPILOTD_TEST_LLAMA_SERVER")
        self.model = required_path("CONTEXTPILOTD_TEST_MODEL")
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # The lock dir under XDG_RUNTIME_DIR must be private.
        os.chmod(self.dir, 0o700)
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.root}/v1"
        self.query_log = self.dir / "query_log.jsonl"
        self.config_path = self.dir / "config.toml"
        self.stderr_path = self.dir / "stderr.log"
        self.server_extra = dict(server or {})
        self.reorder_extra = dict(reorder or {})
        self.llama_extra = dict(llama or {})
        self.api_key = self.server_extra.get("api_key")
        self.process: subprocess.Popen | None = None
        self.killed = False
        self.start_failed = False
        self.exit_code: int | None = None
        self._children_seen: set[int] = set()
        self.config_path.write_text(self.config_text())

    def config_text(self) -> str:
        server_lines = [f'listen = "127.0.0.1:{self.port}"']
        server_lines += [f"{key} = {toml_value(value)}" for key, value in self.server_extra.items()]
        return "\n".join(
            [
                "[server]",
                *server_lines,
                "",
                "[llama]",
                f"binary = {toml_value(str(self.llama_server))}",
                f"model = {toml_value(str(self.model))}",
                f'model_alias = "{MODEL_ALIAS}"',
                "slots = 2",
                "ctx_per_slot = 2048",
                "threads = 2",
                *[f"{key} = {toml_value(value)}" for key, value in self.llama_extra.items()],
                "",
                "[supervisor]",
                "health_interval_ms = 200",
                "hang_timeout_s = 10",
                "stop_timeout_s = 3",
                "restart_backoff_initial_ms = 100",
                "restart_backoff_max_ms = 1000",
                "",
                "[cost]",
                "measure = false",
                "",
                *(["[reorder]", *(f"{k} = {toml_value(v)}" for k, v in self.reorder_extra.items()), ""]
                  if self.reorder_extra else []),
                "[meter]",
                f"query_log = {toml_value(str(self.query_log))}",
                "",
                "[log]",
                f"dir = {toml_value(str(self.dir / 'logs'))}",
                "",
            ]
        )

    # --- lifecycle -------------------------------------------------------

    def start(self) -> "Daemon":
        env = dict(os.environ)
        env["XDG_RUNTIME_DIR"] = str(self.dir)
        with open(self.stderr_path, "wb") as stderr, open(self.dir / "stdout.log", "wb") as stdout:
            self.process = subprocess.Popen(
                [str(self.bin), "run", "--config", str(self.config_path)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=self.dir,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        last = "no answer yet"
        while True:
            code = self.process.poll()
            if code is not None:
                self._abort()
                pytest.fail(
                    f"contextpilotd exited with code {code} before /health answered 200.\n"
                    f"config:\n{self.config_text()}\noutput:\n{self.output()[-4000:]}"
                )
            try:
                r = httpx.get(f"{self.root}/health", timeout=2.0)
                if r.status_code == 200:
                    break
                last = f"HTTP {r.status_code} {r.text[:200]}"
            except httpx.HTTPError as e:
                last = repr(e)
            if time.monotonic() >= deadline:
                self._abort()
                pytest.fail(
                    f"contextpilotd did not answer /health 200 within {START_TIMEOUT_S:.0f} s "
                    f"(last: {last}).\noutput:\n{self.output()[-4000:]}"
                )
            time.sleep(0.1)
        self.child_pid()  # remember the first child for cleanup
        return self

    def _abort(self) -> None:
        """A start that failed: kill whatever runs, check nothing."""
        self.start_failed = True
        assert self.process is not None
        if self.process.poll() is None:
            self.process.kill()
        self.exit_code = self.process.wait()
        self._reap_children()

    def stop(self) -> int | None:
        """SIGTERM, wait (SIGKILL after 20 s), and return the exit code. Then
        makes sure no llama-server this daemon started is left running."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            try:
                self.status()  # remember the current child, for the cleanup below
            except Exception:
                pass
            self.process.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.exit_code = self.process.wait()
                self._reap_children()
                pytest.fail(
                    f"contextpilotd did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM; "
                    f"killed it.\noutput:\n{self.output()[-4000:]}"
                )
        else:
            self.exit_code = self.process.returncode
        self._reap_children()
        return self.exit_code

    def kill(self) -> None:
        """SIGKILL the daemon itself (its exit code is then not checked)."""
        assert self.process is not None
        self.killed = True
        self.process.kill()
        self.exit_code = self.process.wait()

    def _reap_children(self) -> None:
        # A daemon that stopped (or was killed) must not leave its children
        # behind; the Rust tests check that. Here only clean up, so a failure
        # elsewhere does not leave a llama-server eating the machine's 2 cores.
        deadline = time.monotonic() + 5.0
        for pid in self._children_seen:
            while _is_llama_server(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _is_llama_server(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # --- what tests use --------------------------------------------------

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return httpx.get(f"{self.root}{path}", headers=headers, timeout=kwargs.pop("timeout", 10.0), **kwargs)

    def status(self) -> dict:
        r = self.get("/status")
        assert r.status_code == 200, f"GET /status: HTTP {r.status_code}: {r.text[:500]}"
        doc = r.json()
        pid = (doc.get("child") or {}).get("pid")
        if isinstance(pid, int):
            self._children_seen.add(pid)
        return doc

    def child_pid(self) -> int:
        pid = self.status()["child"]["pid"]
        assert isinstance(pid, int) and pid > 0, f"status.child.pid is {pid!r}"
        return pid

    def query_log_lines(self) -> list[dict]:
        """Every line of the query log, parsed; fails on a line that is not a
        JSON object. A missing file is an empty log."""
        if not self.query_log.exists():
            return []
        text = self.query_log.read_text()
        lines = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                obj = json.loads(line)
            except ValueError as e:
                pytest.fail(f"{self.query_log} line {n} is not JSON ({e}): {line[:300]!r}")
            assert isinstance(obj, dict), f"{self.query_log} line {n} is not a JSON object: {line[:300]!r}"
            lines.append(obj)
        return lines

    def wait_query_log(self, count: int, timeout_s: float = 15.0) -> list[dict]:
        """The query log once it has at least `count` lines (it may be written
        just after the response is sent)."""
        def enough() -> list[dict] | None:
            lines = self.query_log_lines()
            return lines if len(lines) >= count else None

        lines = wait_until(timeout_s, f"{count} lines in {self.query_log}", enough) if count > 0 else None
        return lines if lines is not None else self.query_log_lines()

    def output(self) -> str:
        """What the daemon said: its stderr (errors before logging was set up,
        panics), then its log file; with stderr a file, log lines go only
        to the file."""
        def read(path: Path) -> str:
            try:
                return path.read_text(errors="replace")
            except FileNotFoundError:
                return ""
        return read(self.stderr_path) + read(self.dir / "logs" / "contextpilotd.log")

    def client(self, **kwargs: Any):
        import openai

        kwargs.setdefault("api_key", self.api_key or "unused")
        kwargs.setdefault("timeout", 120.0)
        return openai.OpenAI(base_url=self.base_url, **kwargs)


def _is_llama_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"llama-server" in f.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        return False


# --- prompts ---------------------------------------------------------------

_COLORS = ["red", "green", "blue", "amber", "violet", "silver", "black"]
_ITEMS = ["ledger", "lantern", "compass", "kettle", "map", "clock", "rope", "flute", "anchor", "quill", "drum"]


def long_system_prompt(rules: int = 22) -> str:
    """Deterministic text of about 350 SmolLM2 tokens for the default 22 rules
    (measured with llama-server's /tokenize). Prefill runs ~130 tokens/s on
    two cores, so this costs ~3 s once and ~0.2 s when it is reused."""
    lines = ["You are the archivist of a small harbour museum. Answer briefly."]
    for i in range(1, rules + 1):
        lines.append(f"Rule {i}: the {_COLORS[i % 7]} {_ITEMS[i % 11]} stays on shelf {i * 7 % 23}.")
    return "\n".join(lines)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
