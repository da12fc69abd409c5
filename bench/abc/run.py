"""`make bench` / `make bench-quick`: what contextpilotd buys on this machine.

Runs the same requests (bench/abc/workloads.py) against
  A  plain llama-server, documents in retrieval order,
  B  ContextPilot's library (contextpilot.optimize) in front of llama-server,
  C  contextpilotd with `documents`,
each on a fresh llama-server started with the flags contextpilotd plans for
the same configuration, at concurrency 1 and at concurrency N (default: the
planned slot count). At concurrency 1 the three llama-servers run side by
side and each request goes to A, B and C in turn, so a change in the
machine's load hits all three alike (--sequential runs them one after
another); at concurrency N they run one after another. Every figure comes from a response (llama-server's
`timings`) or a clock of this run. Writes a table to stdout, a JSON file and
an SVG chart (default target/bench/abc-<timestamp>.{json,svg}).

    PY=$(bash scripts/python-env.sh bench/abc/requirements.txt | tail -n 1)
    eval "$(bash scripts/provision.sh paths)"
    "$PY" bench/abc/run.py --quick --llama-server "$LLAMA_SERVER" --model "$MODEL"
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
import systems  # noqa: E402
import workloads  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

QUICK = dict(topics=6, doc_chars=130, queries=12, k=8, users=2, turns=3, loops=1, steps=4, file_lines=8)
FULL = dict(topics=10, doc_chars=160, queries=60, k=8, users=4, turns=4, loops=2, steps=6, file_lines=12)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/abc/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (under 10 minutes on 2 cores with SmolLM2-135M)")
    p.add_argument("--model", default=os.environ.get("MODEL"), help="GGUF model (default: $MODEL)")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="llama-server binary (default: $LLAMA_SERVER)")
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    p.add_argument("--contextpilotd", default=str(target / "release/contextpilotd"), help="the daemon binary (default: the release build)")
    p.add_argument("--queries", type=int, help="RAG queries (quick 12, full 60)")
    p.add_argument("--docs", type=int, dest="k", help="documents per request (8)")
    p.add_argument("--doc-chars", type=int, help="about how long a document is, in characters (quick 130, full 160)")
    p.add_argument("--topics", type=int, help="corpus topics, one stdlib module each (quick 6, full 10)")
    p.add_argument("--users", type=int, help="chat users, one conversation each (quick 2, full 4)")
    p.add_argument("--turns", type=int, help="chat turns per user (quick 3, full 4)")
    p.add_argument("--loops", type=int, help="agent loops (quick 1, full 2)")
    p.add_argument("--steps", type=int, help="tool calls per agent loop (quick 4, full 6)")
    p.add_argument("--concurrency", type=int, help="the second concurrency level (default: the planned slot count)")
    p.add_argument("--slots", type=int, help="llama.slots for contextpilotd (default: what it plans)")
    p.add_argument("--ctx-per-slot", type=int, help="llama.ctx_per_slot (default: what it plans)")
    p.add_argument("--max-tokens", type=int, default=16, help="answer length (16)")
    p.add_argument("--workloads", default="rag,chat,agent", help="which to run (rag,chat,agent)")
    p.add_argument("--systems", default="A,B,C", help="which to run (A,B,C)")
    p.add_argument("--sequential", action="store_true",
                   help="at concurrency 1, run the systems one after another instead of three llama-servers at once, each request to A, B and C in turn (the default when three copies of the model fit in half the memory)")
    p.add_argument("--seed", type=int, default=20261122)
    p.add_argument("--out", help="the JSON file (default target/bench/abc-<timestamp>.json; the SVG goes next to it)")
    args = p.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    for key in sizes:
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    args.sizes = sizes
    for what, path in (("--model", args.model), ("--llama-server", args.llama_server), ("--contextpilotd", args.contextpilotd)):
        if not path or not Path(path).is_file():
            p.error(f"{what} must name a file (got {path!r}); `make bench` passes the provisioned ones")
    return args


class Progress:
    """One stderr line per run, rewritten in place on a terminal."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.t0 = label, total, 0, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.lock = threading.Lock()
        self._draw()

    def step(self) -> None:
        with self.lock:
            self.done += 1
            self._draw()

    def _draw(self) -> None:
        width = 24
        filled = int(width * self.done / max(1, self.total))
        line = f"[bench] {self.label:<28} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {time.monotonic() - self.t0:5.0f}s"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if self.done == self.total else ""))
        elif self.done in (0, self.total) or self.done % 5 == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def run_workload(system: systems.System, sessions: list[workloads.Session], concurrency: int,
                 max_tokens: int, label: str) -> tuple[list[dict], float]:
    """Runs every session (its steps in order) with `concurrency` workers;
    returns the per-request records (in workload order) and the wall time."""
    todo: queue.Queue = queue.Queue()
    for s in sessions:
        todo.put(s)
    records: dict[tuple[str, int], dict] = {}
    progress = Progress(label, sum(len(s.steps) for s in sessions))
    failures: list[BaseException] = []

    def worker() -> None:
        with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as http:
            while not failures:
                try:
                    session = todo.get_nowait()
                except queue.Empty:
                    return
                for index in range(len(session.steps)):
                    try:
                        rec = systems.run_step(http, system, session, index, max_tokens)
                    except BaseException as e:  # noqa: BLE001 - reported after the join
                        failures.append(e)
                        return
                    records[(session.id, rec["step"])] = rec
                    progress.step()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, concurrency))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if failures:
        raise failures[0]
    ordered = [records[(s.id, i)] for s in sessions for i in range(len(s.steps))]
    return ordered, wall


def run_interleaved(sysobjs: dict[str, systems.System], sessions: list[workloads.Session], max_tokens: int,
                    label: str) -> dict[str, list[dict]]:
    """Concurrency 1 with the systems side by side: each step of each
    session goes to every system in turn (the first one rotating), one
    request at a time."""
    keys = list(sysobjs)
    out: dict[str, list[dict]] = {k: [] for k in keys}
    progress = Progress(label, len(keys) * sum(len(s.steps) for s in sessions))
    n = 0
    with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as http:
        for session in sessions:
            for index in range(len(session.steps)):
                for j in range(len(keys)):
                    key = keys[(n + j) % len(keys)]
                    out[key].append(systems.run_step(http, sysobjs[key], session, index, max_tokens))
                    progress.step()
                n += 1
    return out


def _fits_three(model: Path, count: int) -> bool:
    """Whether `count` llama-servers with this model fit in half the memory."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return count * model.stat().st_size * 1.5 < memory / 2


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if sys.platform == "darwin":
        with contextlib.suppress(Exception):
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip() or cpu
    mem = None
    with contextlib.suppress(Exception):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": None if mem is None else round(mem, 1),
            "os": f"{platform.system()} {platform.release()}",
            "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    out = Path(args.out) if args.out else ROOT / "target/bench" / f"abc-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    wanted_workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    wanted_systems = [s.strip().upper() for s in args.systems.split(",") if s.strip()]

    # ContextPilot's library prints its index work to stdout and logs; keep the table readable.
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    unavailable: dict[str, str] = {}
    if "B" in wanted_systems:
        with contextlib.redirect_stdout(io.StringIO()):
            reason = systems.library_unavailable()
        if reason:
            unavailable["B"] = reason
            print(f"[bench] B (ContextPilot's library) is unavailable: {reason}", file=sys.stderr)

    corpus, all_workloads = workloads.generate(args.seed, args.sizes)
    chosen = {w: all_workloads[w] for w in wanted_workloads if w in all_workloads}
    llama = {"binary": str(Path(args.llama_server).resolve()), "model": str(Path(args.model).resolve()),
             "model_alias": "bench", "slots": args.slots, "ctx_per_slot": args.ctx_per_slot}
    scratch = Path(tempfile.mkdtemp(prefix="contextpilotd-bench-"))
    probe = systems.Daemon(Path(args.contextpilotd), scratch / "probe", llama)
    command = probe.print_command()

    machine = hardware()  # the load average before anything of the bench runs
    bench_t0 = time.monotonic()
    results: list[dict] = []
    daemon_stats: list[dict] = []
    runnable = [k for k in wanted_systems if k not in unavailable]
    interleave = not args.sequential and _fits_three(Path(args.model), len(runnable))
    first: dict = {}
    run_no = 0

    def start(key: str, wname: str, concurrency: int) -> systems.Daemon:
        nonlocal run_no
        run_no += 1
        daemon = systems.Daemon(Path(args.contextpilotd), scratch / f"run-{run_no}-{key}-{wname}-c{concurrency}", llama).start()
        child_argv = daemon.child.get("command")
        if not first:
            first["argv"] = child_argv
            first["slots"] = _slots_from_argv(child_argv) or 1
        elif _flags(child_argv) != _flags(first["argv"]):
            raise SystemExit(f"llama-server was started with other flags: {child_argv} vs {first['argv']}")
        return daemon

    def finish(key, wname, concurrency, daemon, records, wall):
        if key == "C":
            daemon_stats.append({"workload": wname, "concurrency": concurrency, "stats": daemon.stats()})
        bad = [r for r in records if not r["ok"]]
        if bad:
            print(f"[bench] {key} {wname}: {len(bad)} failed requests, first: {bad[0]['error']}", file=sys.stderr)
        results.append({"system": key, "workload": wname, "concurrency": concurrency, "wall_s": wall,
                        "interleaved": concurrency == 1 and interleave, "requests": records})

    # Concurrency 1: every system on its own fresh llama-server; with
    # `interleave` all of them at once, each request sent to A, B and C in
    # turn, so a change in the machine's load hits all three alike.
    for wname, sessions in chosen.items():
        if interleave:
            daemons = {}
            try:
                for key in runnable:
                    daemons[key] = start(key, wname, 1)
                sysobjs = {key: systems.SYSTEMS[key](d) for key, d in daemons.items()}
                with contextlib.redirect_stdout(io.StringIO()):
                    per_system = run_interleaved(sysobjs, sessions, args.max_tokens, f"c=1 {wname} {'+'.join(runnable)}")
                for key, records in per_system.items():
                    finish(key, wname, 1, daemons[key], records, sum(r["latency_ms"] for r in records) / 1000)
            finally:
                for d in daemons.values():
                    d.stop()
        else:
            for key in runnable:
                daemon = start(key, wname, 1)
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        records, wall = run_workload(systems.SYSTEMS[key](daemon), sessions, 1, args.max_tokens, f"c=1 {wname} {key}")
                    finish(key, wname, 1, daemon, records, wall)
                finally:
                    daemon.stop()
    slots = first.get("slots", 1)
    levels = [1] + ([args.concurrency or slots] if (args.concurrency or slots) != 1 else [])
    # Concurrency N: one system at a time (throughput needs the machine to itself).
    if len(levels) > 1:
        concurrency = levels[1]
        for wname, sessions in chosen.items():
            for key in runnable:
                daemon = start(key, wname, concurrency)
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        records, wall = run_workload(systems.SYSTEMS[key](daemon), sessions, concurrency,
                                                     args.max_tokens, f"c={concurrency} {wname} {key}")
                    finish(key, wname, concurrency, daemon, records, wall)
                finally:
                    daemon.stop()
    argv_seen = first.get("argv")

    total_s = time.monotonic() - bench_t0
    doc = {
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(total_s, 1),
        "command": "python bench/abc/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "hardware": machine,
        "load_avg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "model": Path(args.model).name,
        "llama_server": {"binary": llama["binary"], "argv": argv_seen, "planned_command": command},
        "slots": slots,
        "concurrency_levels": levels,
        "interleaved_at_concurrency_1": interleave,
        "seed": args.seed,
        "sizes": args.sizes,
        "max_tokens": args.max_tokens,
        "corpus": corpus.describe(),
        "systems": {k: systems.SYSTEMS[k].name for k in wanted_systems},
        "unavailable": unavailable,
        "runs": results,
        "contextpilotd_stats": daemon_stats,
    }
    doc["summary"] = report.summarize(doc)
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    svg = out.with_suffix(".svg")
    svg.write_text(report.svg(doc))
    print(report.table(doc))
    print(f"\nJSON: {out}\nchart: {svg}\ntook {total_s / 60:.1f} min")
    shutil.rmtree(scratch, ignore_errors=True)  # the daemons' logs; kept when the bench fails
    return 0


def _slots_from_argv(argv: list[str] | None) -> int | None:
    argv = argv or []
    for i, a in enumerate(argv[:-1]):
        if a in ("--parallel", "-np"):
            return int(argv[i + 1])
    return None


def _flags(argv: list[str] | None) -> list[str]:
    """The argv without the port, which is chosen free for every start."""
    argv = list(argv or [])
    for i, a in enumerate(argv[:-1]):
        if a == "--port":
            argv[i + 1] = "*"
    return argv


if __name__ == "__main__":
    sys.exit(main())
