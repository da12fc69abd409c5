"""The systems of the bench, and the one client that measures them.

A, B and C run on a llama-server started by a fresh contextpilotd with the
same configuration, so all three use the same binary, model and flags (the
ones contextpilotd plans; `/status` gives the child's port and argv). A0 is
the baseline of a user who runs llama-server by hand:

- A0, llama-server with its own defaults: started by the bench itself with
  the model, the address, the same slots and total context as the daemon's
  child, -ngl, -t and --metrics, nothing else; so its host-RAM prompt cache
  (`--cache-ram`) is on and `--cache-reuse`, batch sizes and every flag the
  daemon plans are llama-server's defaults. Its requests are A's.
- A, plain llama-server: requests go straight to the child, documents in
  retrieval order, in the prompt layout contextpilotd renders.
- B, ContextPilot's library (PyPI `contextpilot`), as its docs show for
  llama.cpp: `contextpilot.optimize(docs, query)` reorders each request's
  documents and builds the messages, which go straight to the child. Chat
  turns pass the user as `conversation_id`; agent requests go through its
  `dedup_chat_completions`. The library's time is part of the request's time.
- C, contextpilotd: requests go to the daemon with `documents` (and a
  `conversation_id` per chat user); agent requests are sent as they are.

The daemons of A and B idle while their child is called directly. Each
system gets a fresh daemon (A0 a fresh llama-server; so a fresh KV cache)
for each workload and concurrency level.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from workloads import Session, Step

INSTRUCTION = "Answer the question based on the provided documents."


def plain_system(docs: list[str]) -> str:
    """The system message contextpilotd renders for `documents`, in the
    order given (retrieval order for A)."""
    lines = "".join(f"[{i + 1}] {d}\n" for i, d in enumerate(docs))
    ranking = " > ".join(str(i + 1) for i in range(len(docs)))
    return (
        f"{INSTRUCTION}\n\n<documents>\n{lines}</documents>\n\n"
        f"Read the documents in this importance ranking: {ranking}\n"
        "Prioritize information from higher-ranked documents."
    )


# --- the daemon ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(value: Any) -> str:
    """A TOML value: strings and lists of strings as JSON (which TOML reads
    the same), booleans and numbers as TOML writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (str, list)) else str(value)


class Daemon:
    """One `contextpilotd run` in a directory of its own, with a fresh
    llama-server child (so a fresh KV cache)."""

    def __init__(self, binary: Path, workdir: Path, llama: dict[str, Any], extra_toml: str = ""):
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # the lock directory under XDG_RUNTIME_DIR must be private
        self.port = _free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.config = self.dir / "config.toml"
        # The plain systems (A, B and the eval's layouts) call this daemon's
        # child directly, so it runs without a key of its own.
        llama = {"child_key": False, **llama}
        llama_lines = [f"{k} = {_toml(v)}" for k, v in llama.items() if v is not None]
        self.config.write_text(
            "\n".join([
                "[server]", f'listen = "127.0.0.1:{self.port}"', "max_queue = 1024", "",
                "[llama]", *llama_lines, "",
                "[meter]", f"query_log = {_toml(str(self.dir / 'query_log.jsonl'))}", "",
                "[log]", f"dir = {_toml(str(self.dir / 'logs'))}", "",
                # The caller's own tables (e.g. [cost]), as given.
                *([extra_toml.rstrip("\n"), ""] if extra_toml.strip() else []),
            ])
        )
        self.process: subprocess.Popen | None = None
        self.child: dict[str, Any] = {}

    def print_command(self) -> str:
        r = subprocess.run([str(self.binary), "print-command", "--config", str(self.config)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise SystemExit(f"contextpilotd print-command failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip()

    def tune(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """`contextpilotd tune` with this config, where the binary has it:
        a daemon that plans llama-server's flags from a measurement of this
        machine measures once and caches it. Done before any run, every
        daemon of the bench plans from the same measurement (the same
        flags), and none measures in the background while requests are
        timed. What happened, for the JSON; a failure is reported, not
        fatal (the daemon then plans without a measurement)."""
        try:
            usage = subprocess.run([str(self.binary), "--help"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"ran": False, "why": f"{self.binary} --help: {e}"}
        if not any(line.split()[:1] == ["tune"] for line in usage.stdout.splitlines()):
            return {"ran": False, "why": "this contextpilotd has no tune subcommand"}
        env = dict(os.environ, XDG_RUNTIME_DIR=str(self.dir))
        t0 = time.monotonic()
        try:
            r = subprocess.run([str(self.binary), "tune", "--config", str(self.config)], env=env, cwd=self.dir,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"ran": True, "ok": False, "why": f"did not finish within {timeout_s:.0f} s"}
        out = {"ran": True, "ok": r.returncode == 0, "seconds": round(time.monotonic() - t0, 1)}
        if r.returncode != 0:
            out["why"] = f"exit status {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}"
        return out

    def start(self, timeout_s: float = 180.0) -> "Daemon":
        env = dict(os.environ, XDG_RUNTIME_DIR=str(self.dir))
        with open(self.dir / "stderr.log", "wb") as err:
            self.process = subprocess.Popen([str(self.binary), "run", "--config", str(self.config)], env=env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=self.dir)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"contextpilotd exited with {self.process.returncode} while starting; "
                                 f"see {self.dir / 'logs' / 'contextpilotd.log'} and {self.dir / 'stderr.log'}:\n"
                                 f"{(self.dir / 'stderr.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.root}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"contextpilotd was not ready within {timeout_s:.0f} s; "
                                 f"see {self.dir / 'logs' / 'contextpilotd.log'}")
            time.sleep(0.1)
        status = httpx.get(f"{self.root}/status", timeout=10).json()
        self.child = status["child"]
        # Slots hold prompts; `concurrency` of them run at once (fewer with a shared KV pool).
        self.plan = status.get("plan", {})
        return self

    @property
    def child_url(self) -> str:
        return f"http://127.0.0.1:{self.child['port']}"

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.root}/stats", timeout=10).json()

    def query_log(self) -> list[dict[str, Any]]:
        """Every record of this daemon's query log, oldest first (rotated
        files included). Call it after `stats()`: the meter answers a
        question only after writing every record sent before it."""
        path = self.dir / "query_log.jsonl"
        files = sorted(self.dir.glob("query_log.jsonl.*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
        records = []
        for f in [*files, path]:
            if not f.is_file():
                continue
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: not a record
        return records

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class DirectServer:
    """llama-server started by the bench itself (A0): argv as given, no
    daemon in front. Offers what the systems use of a `Daemon`
    (`child_url`, `child["command"]`)."""

    def __init__(self, argv: list[str], workdir: Path, port: int):
        self.argv = argv
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.process: subprocess.Popen | None = None
        self.child: dict[str, Any] = {"port": port, "command": argv}

    @property
    def child_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> "DirectServer":
        # LLAMA_ARG_* variables would change flags behind the argv's back.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
        log = self.dir / "llama-server.log"
        with open(log, "wb") as out:
            self.process = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"llama-server (A0) exited with {self.process.returncode} while starting; "
                                 f"see {log}:\n{log.read_text(errors='replace')[-2000:]}")
            try:
                # 503 while the model loads, 200 once it serves.
                if httpx.get(f"{self.child_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"llama-server (A0) was not ready within {timeout_s:.0f} s; see {log}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def defaults_argv(binary: str, model: str, port: int, slots: int, ctx_per_slot: int,
                  gpu_layers: int | None, threads: int | None) -> list[str]:
    """A0's llama-server command line: what a user types by hand, every
    other flag at llama-server's default."""
    argv = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", str(slots * ctx_per_slot), "--parallel", str(slots)]
    if gpu_layers is not None:
        argv += ["-ngl", str(gpu_layers)]
    if threads is not None:
        argv += ["-t", str(threads)]
    return argv + ["--metrics"]


# --- the systems ----------------------------------------------------------------


class System:
    key = "?"
    name = "?"

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def request(self, session: Session, step: Step) -> tuple[str, dict[str, Any]]:
        """(url, body without sampling fields) for one step."""
        raise NotImplementedError


class Plain(System):
    key, name = "A", "llama-server"

    def request(self, session, step):
        url = f"{self.daemon.child_url}/v1/chat/completions"
        if step.messages is not None:
            return url, {"messages": step.messages}
        messages = [{"role": "system", "content": plain_system(step.docs)}, *step.history,
                    {"role": "user", "content": step.question}]
        return url, {"messages": messages}


class Defaults(Plain):
    """A's requests, sent to a llama-server at its own defaults."""

    key, name = "A0", "llama-server, its own defaults"


class ContextPilotLibrary(System):
    key, name = "B", "ContextPilot 0.5.0"

    def __init__(self, daemon: Daemon):
        super().__init__(daemon)
        import contextpilot
        import contextpilot.api

        # A fresh llama-server, a fresh library index: forget the previous run's.
        contextpilot.api._default_pilot = None
        self.cp = contextpilot
        self.lock = threading.Lock()  # the library's index is not meant for threads

    def request(self, session, step):
        url = f"{self.daemon.child_url}/v1/chat/completions"
        if step.messages is not None:
            body = {"messages": json.loads(json.dumps(step.messages))}
            self.cp.dedup_chat_completions(body)
            return url, body
        with self.lock:
            if session.workload == "chat":
                system, user = self.cp.optimize(step.docs, step.question, conversation_id=session.id)
            else:
                system, user = self.cp.optimize(step.docs, step.question)
        return url, {"messages": [system, *step.history, user]}


class Daemonized(System):
    key, name = "C", "contextpilotd"

    def request(self, session, step):
        url = f"{self.daemon.root}/v1/chat/completions"
        if step.messages is not None:
            return url, {"messages": step.messages}
        body: dict[str, Any] = {"messages": [*step.history, {"role": "user", "content": step.question}],
                                "documents": step.docs}
        if session.workload == "chat":
            body["conversation_id"] = session.id
        return url, body


SYSTEMS = {cls.key: cls for cls in (Defaults, Plain, ContextPilotLibrary, Daemonized)}


def library_unavailable() -> str | None:
    """Why B cannot run here, or None when ContextPilot's library path works."""
    try:
        import contextpilot
        import contextpilot.api

        contextpilot.api._default_pilot = None
        contextpilot.optimize(["probe a", "probe b"], "probe?")
        contextpilot.api._default_pilot = None
        return None
    except Exception as e:  # noqa: BLE001 - any failure makes B unavailable, with its reason
        return f"{type(e).__name__}: {e}"


# --- the client -------------------------------------------------------------------


def client() -> httpx.Client:
    """The bench's HTTP client: a fresh connection for every request.
    llama-server closes a connection soon after a streamed response although
    it announced keep-alive, so a request sent right away on the reused
    connection gets no response ("Server disconnected without sending a
    response"; every other request at concurrency N). A loopback connect
    costs far less than a millisecond, and every system pays it alike."""
    return httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0), limits=httpx.Limits(max_keepalive_connections=0))


def run_step(http: httpx.Client, system: System, session: Session, index: int, max_tokens: int) -> dict[str, Any]:
    """Builds the request (B's library time included), streams it, and
    returns what was measured: TTFT (first content chunk, or the finishing
    chunk of an empty answer), latency, the
    answer, and llama-server's timings as the response carried them."""
    step = session.steps[index]
    t0 = time.perf_counter()
    url, body = system.request(session, step)
    prepared = time.perf_counter()
    body.update({"max_tokens": max_tokens, "temperature": 0, "stream": True,
                 "stream_options": {"include_usage": True}})
    ttft = None
    parts: list[str] = []
    timings: dict[str, Any] | None = None
    error = None
    with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            error = f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:300]}"
        else:
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue  # SSE comments and blank lines
                data = line[5:].strip()
                if data == "[DONE]":
                    continue  # read to the end of the body, as the OpenAI SDK does
                chunk = json.loads(data)
                if "error" in chunk:
                    error = json.dumps(chunk["error"])[:300]
                if chunk.get("timings"):
                    timings = chunk["timings"]
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    # The first token: the first content, or the end of an
                    # answer whose first token was end-of-turn.
                    if ttft is None and (text or choice.get("finish_reason")):
                        ttft = time.perf_counter() - t0
                    if text:
                        parts.append(text)
    end = time.perf_counter()
    if error is None and timings is None:
        error = "the stream carried no timings"
    return {
        "session": session.id,
        "step": index,
        "ok": error is None,
        "error": error,
        "prepare_ms": (prepared - t0) * 1000,
        "ttft_ms": None if ttft is None else ttft * 1000,
        "latency_ms": (end - t0) * 1000,
        "answer": "".join(parts),
        "cache_n": (timings or {}).get("cache_n"),
        "prompt_n": (timings or {}).get("prompt_n"),
        "prompt_ms": (timings or {}).get("prompt_ms"),
        "predicted_n": (timings or {}).get("predicted_n"),
        "predicted_ms": (timings or {}).get("predicted_ms"),
    }
