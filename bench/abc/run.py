"""`make bench` / `make bench-quick`: what contextpilotd buys on this machine.

Runs the same requests (bench/abc/workloads.py) against
  A0 llama-server as a user starts it by hand: its own defaults (host-RAM
     prompt cache on), the same slots, total context, -ngl and -t,
  A  plain llama-server with the flags contextpilotd plans, documents in
     retrieval order (A0 gets these same requests),
  B  ContextPilot's library (contextpilot.optimize) in front of A's llama-server,
  C  contextpilotd with `documents`,
each on a fresh llama-server (A, B and C: started by a fresh contextpilotd
with the same configuration), at concurrency 1 and at concurrency N
(default: the planned slot count). At concurrency 1 the llama-servers run
side by side and each request goes to every system in turn, so a change in
the machine's load hits all alike (--sequential runs them one after
another); at concurrency N they run one after another. Every figure comes
from a response (llama-server's `timings`), a clock of this run, or C's
query log (the slots it used, its predicted prompt times). Writes a table
to stdout, a JSON file and an SVG chart (default
target/bench/abc-<timestamp>.{json,svg}).

    PY=$(bash scripts/python-env.sh bench/abc/requirements.txt | tail -n 1)
    eval "$(bash scripts/provision.sh paths)"
    "$PY" bench/abc/run.py --quick --llama-server "$LLAMA_SERVER" --model "$MODEL"

On a GPU, with sizes whose prefill takes time there:

    python3 bench/abc/run.py --preset gpu --llama-server LLAMA_SERVER --model MODEL.gguf \\
        --slots 8 --ctx-per-slot 4096 --gpu-layers 99 --threads 8 --concurrency 4
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
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
import systems  # noqa: E402
import workloads  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

QUICK = dict(topics=6, doc_chars=130, queries=12, k=8, users=2, turns=3, loops=1, steps=4, file_lines=8)
FULL = dict(topics=10, doc_chars=160, queries=60, k=8, users=4, turns=4, loops=2, steps=6, file_lines=12)
# Prefill that a GPU notices: RAG prompts of ~1,700 Qwen tokens (16 documents
# of ~400 characters), chat turns of 12 documents, agent histories that stay
# under a 4096-token slot (4 documents a search, 20-line file reads).
PRESETS = {
    "gpu": dict(topics=8, doc_chars=400, queries=96, k=16, users=8, turns=6, chat_docs=12,
                loops=4, steps=8, agent_docs=4, file_lines=20),
}
SIZE_KEYS = ("topics", "doc_chars", "queries", "k", "users", "turns", "chat_docs", "loops", "steps",
             "agent_docs", "topic_docs", "file_lines")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/abc/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (under 10 minutes on 2 cores with SmolLM2-135M)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="gpu: sizes for realistic prefill (RAG 96 queries x 16 documents of ~400 characters, chat 8 users x 6 turns "
                        "with 12 documents, agent 4 loops x 8 steps); the size flags below still override")
    p.add_argument("--model", default=os.environ.get("MODEL"), help="GGUF model (default: $MODEL)")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="llama-server binary (default: $LLAMA_SERVER)")
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    p.add_argument("--contextpilotd", default=str(target / "release/contextpilotd"), help="the daemon binary (default: the release build)")
    p.add_argument("--queries", type=int, help="RAG queries (quick 12, full 60, gpu 96)")
    p.add_argument("--docs", type=int, dest="k", help="documents per RAG request (8; gpu 16)")
    p.add_argument("--chat-docs", type=int, help="documents per chat turn (default: --docs; gpu 12)")
    p.add_argument("--agent-docs", type=int, help="documents per agent search (default: half of --docs; gpu 4)")
    p.add_argument("--topic-docs", type=int, help="documents per topic (default: twice --docs, at least 16)")
    p.add_argument("--doc-chars", type=int, help="about how long a document is, in characters (quick 130, full 160, gpu 400)")
    p.add_argument("--topics", type=int, help="corpus topics, one stdlib module or package each (quick 6, full 10, gpu 8)")
    p.add_argument("--users", type=int, help="chat users, one conversation each (quick 2, full 4, gpu 8)")
    p.add_argument("--turns", type=int, help="chat turns per user (quick 3, full 4, gpu 6)")
    p.add_argument("--loops", type=int, help="agent loops (quick 1, full 2, gpu 4)")
    p.add_argument("--steps", type=int, help="tool calls per agent loop (quick 4, full 6, gpu 8)")
    p.add_argument("--file-lines", type=int, help="lines per agent file read (quick 8, full 12, gpu 20)")
    p.add_argument("--concurrency", type=int, help="the second concurrency level (default: the planned slot count)")
    p.add_argument("--slots", type=int, help="llama.slots for contextpilotd, --parallel for A0 (default: what contextpilotd plans)")
    p.add_argument("--ctx-per-slot", type=int, help="llama.ctx_per_slot; A0 gets slots x this as --ctx-size (default: what contextpilotd plans)")
    p.add_argument("--gpu-layers", type=int, help="llama.gpu_layers for contextpilotd, -ngl for A0 (default: what contextpilotd plans)")
    p.add_argument("--threads", type=int, help="llama.threads for contextpilotd, -t for A0 (default: what contextpilotd plans)")
    p.add_argument("--extra-daemon-toml", default="", metavar="TEXT",
                   help="raw TOML appended to every daemon's config, e.g. $'[cost]\\nkey = 1' (tables other than "
                        "[server], [llama], [meter], [log], which the bench writes)")
    p.add_argument("--no-tune", action="store_true",
                   help="do not run `contextpilotd tune` before the runs (where the daemon has it: it measures this machine "
                        "once, so every daemon plans the same flags and none measures while requests are timed)")
    p.add_argument("--max-tokens", type=int, default=16, help="answer length (16)")
    p.add_argument("--workloads", default="rag,chat,agent", help="which to run (rag,chat,agent)")
    p.add_argument("--systems", default="A0,A,B,C", help="which to run (A0,A,B,C)")
    p.add_argument("--sequential", action="store_true",
                   help="at concurrency 1, run the systems one after another instead of their llama-servers at once, each request to every system in turn (the default when the copies of the model fit in half the memory)")
    p.add_argument("--seed", type=int, default=20261122)
    p.add_argument("--out", help="the JSON file (default target/bench/abc-<timestamp>.json; the SVG goes next to it)")
    args = p.parse_args(argv)
    if args.quick and args.preset:
        p.error("--quick and --preset choose sizes both; give one")
    sizes = dict(PRESETS[args.preset] if args.preset else QUICK if args.quick else FULL)
    for key in SIZE_KEYS:
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    args.sizes = workloads.default_sizes(sizes)
    for what, path in (("--model", args.model), ("--llama-server", args.llama_server), ("--contextpilotd", args.contextpilotd)):
        if not path or not Path(path).is_file():
            p.error(f"{what} must name a file (got {path!r}); `make bench` passes the provisioned ones")
    # Absolute: the daemons and A0's llama-server run in directories of their own.
    args.model, args.llama_server, args.contextpilotd = (str(Path(x).resolve()) for x in (args.model, args.llama_server, args.contextpilotd))
    unknown = [s for s in (x.strip().upper() for x in args.systems.split(",")) if s and s not in systems.SYSTEMS]
    if unknown:
        p.error(f"--systems: unknown {', '.join(unknown)} (known: {', '.join(systems.SYSTEMS)})")
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
        with systems.client() as http:
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
    with systems.client() as http:
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
             "model_alias": "bench", "slots": args.slots, "ctx_per_slot": args.ctx_per_slot,
             "gpu_layers": args.gpu_layers, "threads": args.threads}
    machine = hardware()  # the load average before anything of the bench runs
    scratch = Path(tempfile.mkdtemp(prefix="contextpilotd-bench-"))
    probe = systems.Daemon(Path(args.contextpilotd), scratch / "probe", llama, args.extra_daemon_toml)
    tuned = {"ran": False, "why": "--no-tune"} if args.no_tune else probe.tune()
    if tuned.get("ran") and not tuned.get("ok"):
        print(f"[bench] contextpilotd tune failed ({tuned['why']}); the daemons plan without it", file=sys.stderr)
    command = probe.print_command()  # after tune: the plan every daemon of the bench should make

    bench_t0 = time.monotonic()
    results: list[dict] = []
    daemon_stats: list[dict] = []
    runnable = [k for k in wanted_systems if k not in unavailable]
    # A0 starts after the daemons, so that its shape comes from a child
    # contextpilotd actually started (see a0_shape); the order of requests
    # is still `runnable`'s.
    start_order = sorted(runnable, key=lambda k: k == "A0")
    interleave = not args.sequential and _fits_three(Path(args.model), len(runnable))
    first: dict = {}
    a0_argvs: list[list[str]] = []
    run_no = 0

    def a0_shape() -> tuple[int, int, int | None, int | None]:
        """(slots, ctx per slot, -ngl, -t) for A0: what the user gave, else
        what the daemon's child got (its /status argv, or the planned
        command when no daemon has started yet), so that A0 and A have the
        same slots and total context."""
        argv = first.get("argv") or shlex.split(command)
        slots = args.slots or _flag_int(argv, "--parallel", "-np")
        ctx = _flag_int(argv, "--ctx-size", "-c")
        if not slots or not ctx:
            raise SystemExit(f"cannot read --parallel and --ctx-size from the daemon's llama-server argv: {argv}")
        ctx_per_slot = args.ctx_per_slot or ctx // slots
        gpu_layers = args.gpu_layers if args.gpu_layers is not None else _flag_int(argv, "-ngl", "--n-gpu-layers")
        threads = args.threads if args.threads is not None else _flag_int(argv, "-t", "--threads")
        return slots, ctx_per_slot, gpu_layers, threads

    def start(key: str, wname: str, concurrency: int):
        nonlocal run_no
        run_no += 1
        workdir = scratch / f"run-{run_no}-{key}-{wname}-c{concurrency}"
        if key == "A0":
            port = systems._free_port()
            argv = systems.defaults_argv(llama["binary"], llama["model"], port, *a0_shape())
            if not a0_argvs:
                a0_argvs.append(argv)
            return systems.DirectServer(argv, workdir, port).start()
        daemon = systems.Daemon(Path(args.contextpilotd), workdir, llama, args.extra_daemon_toml).start()
        child_argv = daemon.child.get("command")
        if not first:
            first["argv"] = child_argv
            first["slots"] = _flag_int(child_argv, "--parallel", "-np") or 1
            first["concurrency"] = getattr(daemon, "plan", {}).get("concurrency") or first["slots"]
        elif _flags(child_argv) != _flags(first["argv"]):
            daemon.stop()
            raise SystemExit(f"contextpilotd started llama-server with other flags than in the first run of this bench, "
                             f"so A, B and C would not compare like for like: {child_argv} vs {first['argv']}. A daemon "
                             "that plans from a measurement it made in the meantime does that: let `contextpilotd tune` "
                             "run first (no --no-tune) or pin the plan with --extra-daemon-toml")
        return daemon

    def finish(key, wname, concurrency, daemon, records, wall):
        run = {"system": key, "workload": wname, "concurrency": concurrency, "wall_s": wall,
               "interleaved": concurrency == 1 and interleave, "child_argv": daemon.child.get("command"),
               "requests": records}
        if key == "C":
            daemon_stats.append({"workload": wname, "concurrency": concurrency, "stats": daemon.stats()})
            # After /stats, so every record of the run is in the file; before
            # the scratch directory (the daemon's) is removed.
            run["query_log"] = [_log_fields(r) for r in daemon.query_log()]
        bad = [r for r in records if not r["ok"]]
        if bad:
            print(f"[bench] {key} {wname}: {len(bad)} failed requests, first: {bad[0]['error']}", file=sys.stderr)
        results.append(run)

    # Concurrency 1: every system on its own fresh llama-server; with
    # `interleave` all of them at once, each request sent to every system in
    # turn, so a change in the machine's load hits all of them alike.
    for wname, sessions in chosen.items():
        if interleave:
            daemons = {}
            try:
                for key in start_order:
                    daemons[key] = start(key, wname, 1)
                sysobjs = {key: systems.SYSTEMS[key](daemons[key]) for key in runnable}
                with contextlib.redirect_stdout(io.StringIO()):
                    per_system = run_interleaved(sysobjs, sessions, args.max_tokens, f"c=1 {wname} {'+'.join(runnable)}")
                for key, records in per_system.items():
                    finish(key, wname, 1, daemons[key], records, sum(r["latency_ms"] for r in records) / 1000)
            finally:
                for d in daemons.values():
                    d.stop()
        else:
            for key in start_order:
                daemon = start(key, wname, 1)
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        records, wall = run_workload(systems.SYSTEMS[key](daemon), sessions, 1, args.max_tokens, f"c=1 {wname} {key}")
                    finish(key, wname, 1, daemon, records, wall)
                finally:
                    daemon.stop()
    slots = first.get("slots") or (a0_shape()[0] if a0_argvs else 1)
    # The second level is what the daemon admits at once (its slots, or
    # fewer when a shared KV pool keeps more prompts resident than it runs).
    parallel = args.concurrency or first.get("concurrency") or slots
    levels = [1] + ([parallel] if parallel != 1 else [])
    # Concurrency N: one system at a time (throughput needs the machine to itself).
    if len(levels) > 1:
        concurrency = levels[1]
        for wname, sessions in chosen.items():
            for key in start_order:
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
        "command": shlex.join(["python", "bench/abc/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "hardware": machine,
        "load_avg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "model": Path(args.model).name,
        "tune": tuned,
        "llama_server": {"binary": llama["binary"], "argv": argv_seen, "planned_command": command,
                         "argv_A0": a0_argvs[0] if a0_argvs else None},
        "slots": slots,
        "concurrency_levels": levels,
        "interleaved_at_concurrency_1": interleave,
        "seed": args.seed,
        "sizes": args.sizes,
        "max_tokens": args.max_tokens,
        "extra_daemon_toml": args.extra_daemon_toml or None,
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


def _flag_int(argv: list[str] | None, *names: str) -> int | None:
    """The integer after the last of `names` in `argv` (llama-server keeps
    the last of a repeated flag), or None."""
    argv = argv or []
    value = None
    for i, a in enumerate(argv[:-1]):
        if a in names:
            with contextlib.suppress(ValueError):
                value = int(argv[i + 1])
    return value


def _log_fields(record: dict) -> dict:
    """What the report reads of one query-log record: the slot it went to,
    the daemon's predicted prompt time for its slot choice (newer daemons
    only) and llama-server's measured prompt time."""
    decision = record.get("slot_decision")
    reuse = record.get("cache_reuse")
    return {"slot_id": record.get("slot_id"),
            "predicted_ms": decision.get("predicted_ms") if isinstance(decision, dict) else None,
            "prompt_ms": reuse.get("prompt_eval_ms") if isinstance(reuse, dict) else None,
            "status_code": record.get("status_code")}


def _flags(argv: list[str] | None) -> list[str]:
    """The argv without the port, which is chosen free for every start."""
    argv = list(argv or [])
    for i, a in enumerate(argv[:-1]):
        if a == "--port":
            argv[i + 1] = "*"
    return argv


if __name__ == "__main__":
    sys.exit(main())
