"""`make bench-routing`: cache-aware routing against round robin over the
same backends.

For each policy (`[routing] policy = "cache-aware"`, then `"round-robin"`)
the bench starts FRESH backends, so no cache carries over from one policy to
the other: B plain llama-servers (default 2, one slot each) and one
contextpilotd whose own child (one slot) is backend B+1, with the plain ones
as `[[upstream]]` (`kind = "llama-server"`, or `kind = "openai"` with
--openai-kind). Every backend runs the same llama-server argv: the one the
daemon plans for its child (`contextpilotd print-command` after `tune`),
only the port differs; the daemon's child is checked against it once
started. Then the same requests go to the daemon at concurrency C (default:
the number of backends), streamed: a RAG workload of topical sessions
(workloads.topical_rag: every topic gets as many queries, interleaved with
the other topics' queries; a query's documents come from its topic, one
from another topic now and then; with --follow-ups N, default 1, each query
is a session of N more questions on the same documents, the conversation so
far sent along).

Printed per policy: requests, the share of prompt tokens served from cache
(the daemon's query log: `cache_reuse.reused_tokens` over
`total_prompt_tokens`), TTFT p50 and p95 (client clock, request sent to
first content token), requests per second (requests / wall time of the
run), and the requests each backend served (the query log's `backend`);
then the ratios cache-aware / round-robin. Every figure comes from this
run. Writes target/bench/routing-<timestamp>.json.

    PY=$(bash scripts/python-env.sh bench/abc/requirements.txt | tail -n 1)
    eval "$(bash scripts/provision.sh paths)"
    "$PY" bench/abc/routing.py --quick --llama-server "$LLAMA_SERVER" --model "$MODEL"
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402

import report  # noqa: E402
import run as abc  # noqa: E402
import systems  # noqa: E402
import workloads  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

QUICK = dict(topics=4, doc_chars=130, queries=36, k=8)
FULL = dict(topics=6, doc_chars=160, queries=120, k=8)
# Prefill a GPU notices, as run.py's gpu preset: 16 documents of ~400 characters.
PRESETS = {"gpu": dict(topics=8, doc_chars=400, queries=192, k=16)}
SIZE_KEYS = ("topics", "doc_chars", "queries", "k", "topic_docs")
POLICIES = ("cache-aware", "round-robin")
NO_TIMINGS = "the stream carried no timings"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/abc/routing.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes on 2 cores with SmolLM2-135M)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="gpu: 16 documents of ~400 characters a query, 192 queries, 8 topics")
    p.add_argument("--model", default=os.environ.get("MODEL"), help="GGUF model (default: $MODEL)")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="llama-server binary (default: $LLAMA_SERVER)")
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    p.add_argument("--contextpilotd", default=str(target / "release/contextpilotd"), help="the daemon binary (default: the release build)")
    p.add_argument("--backends", type=int, default=2, help="plain llama-servers besides the daemon's child (2)")
    p.add_argument("--openai-kind", action="store_true",
                   help="configure the plain llama-servers as kind openai (their /v1 routes only) instead of llama-server")
    p.add_argument("--concurrency", type=int, help="requests in flight (default: the number of backends, the child included)")
    p.add_argument("--queries", type=int, help="RAG queries (quick 36, full 120, gpu 192)")
    p.add_argument("--topics", type=int, help="topics (quick 4, full 6, gpu 8)")
    p.add_argument("--docs", type=int, dest="k", help="documents per query (8; gpu 16)")
    p.add_argument("--doc-chars", type=int, help="about how long a document is (quick 130, full 160, gpu 400)")
    p.add_argument("--topic-docs", type=int, help="documents per topic (default: twice --docs, at least 16)")
    p.add_argument("--slots", type=int, default=1, help="slots of every backend (1; several on a GPU)")
    p.add_argument("--follow-ups", type=int, default=1,
                   help="follow-up questions per query, about the same documents with the conversation so far (1; 0: single questions)")
    p.add_argument("--cross", type=float, default=0.3, help="chance a query's last document comes from another topic (0.3)")
    p.add_argument("--ctx-per-slot", type=int, help="llama.ctx_per_slot; the plain servers get the same --ctx-size (default: planned)")
    p.add_argument("--gpu-layers", type=int, help="llama.gpu_layers, the same -ngl for every backend (default: planned)")
    p.add_argument("--threads", type=int, help="llama.threads, the same -t for every backend (default: planned)")
    p.add_argument("--cache-ram", type=int, metavar="MIB",
                   help="--cache-ram for every backend, the child included (llama.extra_args); 0 turns llama-server's "
                        "host-RAM prompt cache off (default: what the daemon plans)")
    p.add_argument("--policies", default=",".join(POLICIES), help="which policies, in order (cache-aware,round-robin)")
    p.add_argument("--no-tune", action="store_true", help="do not run `contextpilotd tune` first")
    p.add_argument("--max-tokens", type=int, default=16, help="answer length (16)")
    p.add_argument("--seed", type=int, default=20261203)
    p.add_argument("--out", help="the JSON file (default target/bench/routing-<timestamp>.json)")
    args = p.parse_args(argv)
    if args.quick and args.preset:
        p.error("--quick and --preset choose sizes both; give one")
    if args.backends < 1:
        p.error("--backends must be at least 1 (routing needs two backends: the child and one upstream)")
    sizes = dict(PRESETS[args.preset] if args.preset else QUICK if args.quick else FULL)
    for key in SIZE_KEYS:
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    sizes.setdefault("topic_docs", max(16, 2 * sizes["k"]))
    args.sizes = sizes
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    bad = [x for x in args.policies if x not in POLICIES]
    if bad:
        p.error(f"--policies: unknown {', '.join(bad)} (known: {', '.join(POLICIES)})")
    for what, path in (("--model", args.model), ("--llama-server", args.llama_server), ("--contextpilotd", args.contextpilotd)):
        if not path or not Path(path).is_file():
            p.error(f"{what} must name a file (got {path!r}); `make bench-routing` passes the provisioned ones")
    args.model, args.llama_server, args.contextpilotd = (str(Path(x).resolve()) for x in (args.model, args.llama_server, args.contextpilotd))
    return args


def _with_port(argv: list[str], port: int) -> list[str]:
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a == "--port":
            out[i + 1] = str(port)
    return out


def _upstreams_toml(policy: str, ports: list[int], openai: bool) -> str:
    lines = ["[routing]", f'policy = "{policy}"', ""]
    for port in ports:
        url = f"http://127.0.0.1:{port}" + ("/v1" if openai else "")
        lines += ["[[upstream]]", f'url = "{url}"', f'kind = "{"openai" if openai else "llama-server"}"', ""]
    return "\n".join(lines)


def _wait_backends(daemon: systems.Daemon, count: int, timeout_s: float = 180.0) -> list[dict]:
    """/models/loaded once `count` backends are ready (the daemon's probes
    of its upstreams included)."""
    deadline = time.monotonic() + timeout_s
    models: list[dict] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            models = httpx.get(f"{daemon.root}/models/loaded", timeout=5).json().get("models") or []
            if sum(1 for m in models if m.get("state") == "ready") >= count:
                return models
        time.sleep(0.25)
    raise SystemExit(f"only {sum(1 for m in models if m.get('state') == 'ready')} of {count} backends were ready "
                     f"within {timeout_s:.0f} s: {json.dumps(models)[:1000]}")


def run_policy(args, policy: str, workdir: Path, llama: dict, planned: list[str], sessions, concurrency: int) -> dict:
    ports = [systems._free_port() for _ in range(args.backends)]
    plain = []
    daemon = None
    try:
        for i, port in enumerate(ports):
            plain.append(systems.DirectServer(_with_port(planned, port), workdir / f"plain-{i + 1}", port).start())
        daemon = systems.Daemon(Path(args.contextpilotd), workdir / "daemon", llama,
                                _upstreams_toml(policy, ports, args.openai_kind)).start()
        loaded = _wait_backends(daemon, args.backends + 1)
        child_argv = daemon.child.get("command")
        same_flags = abc._flags(child_argv) == abc._flags(planned)
        if not same_flags:
            print(f"[routing] the daemon's child runs other flags than the plain servers: {child_argv} vs {planned}",
                  file=sys.stderr)
        names = {"local": "child"}
        for i, port in enumerate(ports):
            url = f"http://127.0.0.1:{port}" + ("/v1" if args.openai_kind else "")
            names[url] = f"plain-{i + 1}"
        with contextlib.redirect_stdout(io.StringIO()):
            records, wall = abc.run_workload(systems.Daemonized(daemon), sessions, concurrency, args.max_tokens,
                                             f"{policy} c={concurrency}")
        # An openai-kind backend's stream carries usage, not llama-server's
        # timings: not a failure (its cache share is in the query log).
        for r in records:
            if r["error"] == NO_TIMINGS:
                r["ok"], r["error"] = True, None
        daemon.stats()  # every record written before the log is read
        log = [r for r in daemon.query_log() if r.get("path") == "/v1/chat/completions"]
        return {"policy": policy, "concurrency": concurrency, "wall_s": wall, "requests": records,
                "query_log": [_log_fields(r, names) for r in log], "backends": names,
                "models_loaded": loaded, "child_argv": child_argv, "child_same_flags": same_flags,
                "plain_argv": [s.argv for s in plain]}
    finally:
        if daemon is not None:
            daemon.stop()
        for s in plain:
            s.stop()


def _log_fields(r: dict, names: dict[str, str]) -> dict:
    reuse = r.get("cache_reuse") if isinstance(r.get("cache_reuse"), dict) else {}
    backend = r.get("backend")
    return {"backend": names.get(backend, backend), "backend_url": backend, "status_code": r.get("status_code"),
            "reused_tokens": reuse.get("reused_tokens"), "total_prompt_tokens": reuse.get("total_prompt_tokens"),
            "prompt_eval_ms": reuse.get("prompt_eval_ms"), "ttft_ms": r.get("ttft_ms"), "slot_id": r.get("slot_id")}


def summarize(run: dict) -> dict:
    recs = [x for x in run["requests"] if x["ok"]]
    log = run["query_log"]
    metered = [x for x in log if isinstance(x["total_prompt_tokens"], int)]
    reused = sum(x["reused_tokens"] or 0 for x in metered)
    total = sum(x["total_prompt_tokens"] for x in metered)
    per_backend: dict[str, int] = {name: 0 for name in run["backends"].values()}
    backend_tokens: dict[str, list[int]] = {}
    for x in log:
        per_backend[x["backend"] or "none"] = per_backend.get(x["backend"] or "none", 0) + 1
        if isinstance(x["total_prompt_tokens"], int):
            t = backend_tokens.setdefault(x["backend"] or "none", [0, 0])
            t[0] += x["reused_tokens"] or 0
            t[1] += x["total_prompt_tokens"]
    # The client's view of the same: llama-server's timings as streamed back.
    timed = [x for x in recs if x["cache_n"] is not None and x["prompt_n"] is not None]
    c_cached = sum(x["cache_n"] for x in timed)
    c_total = c_cached + sum(x["prompt_n"] for x in timed)
    n = len(run["requests"])
    return {
        "policy": run["policy"], "concurrency": run["concurrency"], "requests": n, "failed": n - len(recs),
        "logged": len(log), "metered": len(metered),
        "cache_share": reused / total if total else None, "prompt_tokens": total, "prompt_tokens_reused": reused,
        "cache_share_from_responses": c_cached / c_total if c_total else None, "responses_with_timings": len(timed),
        "ttft_ms_p50": report.percentile([x["ttft_ms"] for x in recs], 0.5),
        "ttft_ms_p95": report.percentile([x["ttft_ms"] for x in recs], 0.95),
        "latency_ms_p50": report.percentile([x["latency_ms"] for x in recs], 0.5),
        "wall_s": run["wall_s"], "requests_per_s": len(recs) / run["wall_s"] if run["wall_s"] else None,
        "per_backend": per_backend,
        "max_backend_share": max(per_backend.values()) / len(log) if log else None,
        "cache_share_per_backend": {b: (t[0] / t[1] if t[1] else None) for b, t in backend_tokens.items()},
    }


def table(doc: dict) -> str:
    s = doc["summary"]
    hw = doc["hardware"]
    lines = [f"model {doc['model']} | {doc['backends']} backends of {doc.get('slots', 1)} slot(s) (the daemon's child + {doc['backends'] - 1} "
             f"plain llama-server{'s' if doc['backends'] > 2 else ''}, kind {doc['upstream_kind']}) | concurrency "
             f"{doc['concurrency']} | {doc['sizes']['queries']} queries over {doc['sizes']['topics']} topics, "
             f"{doc['sizes']['k']} documents each, {doc.get('follow_ups', 0)} follow-up(s) each",
             f"{hw['cpu']}, {hw['cores']} cores | load avg at start "
             f"{', '.join(f'{x:.1f}' for x in hw['load_avg_at_start'] or [])}",
             f"every backend: {doc['backend_flags']}", ""]
    head = f"{'policy':<12} {'reqs':>4} {'fail':>4} {'cache share':>11} {'TTFT p50':>9} {'TTFT p95':>9} {'req/s':>6}  requests per backend"
    lines += [head, "-" * len(head)]
    for e in s:
        per = ", ".join(f"{b} {c}" for b, c in e["per_backend"].items())
        lines.append(f"{e['policy']:<12} {e['requests']:>4} {e['failed']:>4} {report._fmt(e['cache_share'], '.1%'):>11} "
                     f"{report._fmt(e['ttft_ms_p50'], '.0f', 'ms'):>9} {report._fmt(e['ttft_ms_p95'], '.0f', 'ms'):>9} "
                     f"{report._fmt(e['requests_per_s'], '.2f'):>6}  {per} (max {report._fmt(e['max_backend_share'], '.0%')})")
    by = {e["policy"]: e for e in s}
    if "cache-aware" in by and "round-robin" in by:
        a, r = by["cache-aware"], by["round-robin"]
        ratio = doc["ratios"]
        lines += ["", "cache-aware / round-robin: "
                  f"cache share {report._fmt(ratio['cache_share'], '.2f', 'x')}, "
                  f"TTFT p50 {report._fmt(ratio['ttft_ms_p50'], '.2f', 'x')} (below 1 is faster), "
                  f"req/s {report._fmt(ratio['requests_per_s'], '.2f', 'x')}"]
        if a["cache_share_from_responses"] is not None and r["cache_share_from_responses"] is not None:
            lines.append(f"cache share from the responses' timings ({a['responses_with_timings']} and "
                         f"{r['responses_with_timings']} responses): cache-aware "
                         f"{a['cache_share_from_responses']:.1%}, round-robin {r['cache_share_from_responses']:.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    out = Path(args.out) if args.out else ROOT / "target/bench" / f"routing-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus = workloads.build_corpus(args.seed, args.sizes["topics"], args.sizes["doc_chars"], args.sizes["topic_docs"])
    sessions = workloads.topical_rag(corpus, random.Random(f"{args.seed}-routing"), args.sizes["queries"],
                                     args.sizes["k"], args.cross, args.follow_ups)
    llama = {"binary": args.llama_server, "model": args.model, "model_alias": "bench", "slots": args.slots,
             "ctx_per_slot": args.ctx_per_slot, "gpu_layers": args.gpu_layers, "threads": args.threads,
             "extra_args": ["--cache-ram", str(args.cache_ram)] if args.cache_ram is not None else None}
    machine = abc.hardware()
    scratch = Path(tempfile.mkdtemp(prefix="contextpilotd-routing-"))
    probe = systems.Daemon(Path(args.contextpilotd), scratch / "probe", llama)
    tuned = {"ran": False, "why": "--no-tune"} if args.no_tune else probe.tune()
    if tuned.get("ran") and not tuned.get("ok"):
        print(f"[routing] contextpilotd tune failed ({tuned['why']}); the daemons plan without it", file=sys.stderr)
    planned = shlex.split(probe.print_command())
    backends = args.backends + 1
    concurrency = args.concurrency or backends
    t0 = time.monotonic()
    runs = []
    for n, policy in enumerate(args.policies):
        runs.append(run_policy(args, policy, scratch / f"run-{n + 1}-{policy}", llama, planned, sessions, concurrency))
        bad = [r for r in runs[-1]["requests"] if not r["ok"]]
        if bad:
            print(f"[routing] {policy}: {len(bad)} failed requests, first: {bad[0]['error']}", file=sys.stderr)
    summary = [summarize(r) for r in runs]
    by = {e["policy"]: e for e in summary}
    ratios = None
    if "cache-aware" in by and "round-robin" in by:
        a, r = by["cache-aware"], by["round-robin"]
        ratios = {k: report._ratio(a[k], r[k]) for k in ("cache_share", "ttft_ms_p50", "ttft_ms_p95", "requests_per_s")}
    # The argv without the binary and the model (the same for all), the port as "*".
    flags = abc._flags(planned)[3:] if planned[1:2] == ["-m"] else abc._flags(planned)[1:]
    doc = {
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "command": shlex.join(["python", "bench/abc/routing.py", *(sys.argv[1:] if argv is None else argv)]),
        "hardware": machine,
        "load_avg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "model": Path(args.model).name,
        "tune": tuned,
        "planned_argv": planned,
        "backend_flags": shlex.join(flags),
        "backends": backends,
        "slots": args.slots,
        "upstream_kind": "openai" if args.openai_kind else "llama-server",
        "concurrency": concurrency,
        "seed": args.seed,
        "sizes": args.sizes,
        "cross": args.cross,
        "follow_ups": args.follow_ups,
        "max_tokens": args.max_tokens,
        "corpus": corpus.describe(),
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    print(table(doc))
    print(f"\nJSON: {out}\ntook {doc['duration_s'] / 60:.1f} min")
    shutil.rmtree(scratch, ignore_errors=True)  # kept when the bench fails, for the logs
    return 0


if __name__ == "__main__":
    sys.exit(main())
