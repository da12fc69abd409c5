"""The known-answer quality eval: does contextpilotd keep answers right?

Every question of bench/abc/facts.py has one answer that exactly one of its
documents states. For each model, the same questions go, one at a time, to

  A   plain llama-server: documents in the client's relevance order, in
      the layout contextpilotd renders for them (systems.plain_system),
      history and question after them;
  C:<setting>  contextpilotd with `documents` (and a conversation id per
      chat user) under a `[reorder]` setting (`quality = "strict"`, the
      default, and `quality = "balanced"`);

and, with --ablations, prompt layouts that change one thing at a time
(rendered here, sent to a plain llama-server of their own; see LAYOUTS;
`L:plain` sends A's own prompts there, a control that shows how many
answers change with the cache's history alone), which says what in a
rewritten prompt costs answers. Each system's
accuracy has a 95 % Wilson interval; each is paired with A on the same
questions (exact McNemar test: the questions A got right and it got wrong,
and the reverse). The runs also report what the cache held (share of prompt
tokens from cache) and TTFT, so quality stands next to time.

    PY=$(bash scripts/python-env.sh bench/abc/requirements.txt | tail -n 1)
    eval "$(bash scripts/provision.sh paths)"
    "$PY" bench/abc/quality.py --quick --llama-server "$LLAMA_SERVER" --model "$MODEL" --model "$GEMMA_MODEL"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import facts  # noqa: E402
import report  # noqa: E402
import systems  # noqa: E402
from run import Progress, run_interleaved  # noqa: E402
from workloads import Session  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# Five documents a question: with eight the two small models answered one
# question in eight in a trial, with six under a third, which leaves a paired
# test little to compare; with five they answer a quarter to a half.
QUICK = dict(topics=6, topic_docs=16, doc_chars=120, queries=48, k=5, users=12, turns=4, chat_docs=5,
             loops=12, steps=4, agent_docs=4)
FULL = dict(topics=10, topic_docs=16, doc_chars=120, queries=200, k=5, users=40, turns=5, chat_docs=5,
            loops=40, steps=5, agent_docs=4)

# The daemon's settings under test: name -> TOML appended to its config.
# strict (the default) and balanced differ in inferred mode only, so on
# rag and chat (requests with `documents`) they behave alike: two runs of
# one configuration, which shows the eval's noise.
SETTINGS = {
    "strict": '[reorder]\nquality = "strict"\n',
    "balanced": '[reorder]\nquality = "balanced"\n',
}
# Daemon settings of the ablations: block dedup, on the agent workload,
# whose requests the daemon rewrites by dedup and (balanced) inferred mode.
DAEMON_ABLATIONS = {
    "balanced-no-dedup": ("inferred mode without block dedup", ("agent",),
                          '[reorder]\nquality = "balanced"\ndedup = false\n'),
}

# --- statistics -----------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p: under no difference, each discordant
    question is lost or gained with probability 1/2."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


# --- layouts for the ablations ------------------------------------------------------

INSTRUCTION = systems.INSTRUCTION
RANKING_TAIL = "\nPrioritize information from higher-ranked documents."


def _system(docs: list[str], order: list[int], *, ranking: bool = True, labels: str = "position") -> str:
    """The documents `docs` (client's order) rendered in `order`. labels:
    "position" numbers them [1]..[n] where they stand (contextpilotd's
    layout), "relevance" keeps each one's relevance rank as its label.
    The ranking line lists the labels in relevance order."""
    label = {i: (pos + 1 if labels == "position" else i + 1) for pos, i in enumerate(order)}
    lines = "".join(f"[{label[i]}] {docs[i]}\n" for i in order)
    out = f"{INSTRUCTION}\n\n<documents>\n{lines}</documents>"
    if ranking:
        out += "\n\nRead the documents in this importance ranking: " + " > ".join(str(label[i]) for i in range(len(docs)))
        out += RANKING_TAIL
    return out


class Canonical:
    """First-seen order over the whole eval, as contextpilotd's registry
    keeps it: a reordered layout puts documents seen earlier first."""

    def __init__(self) -> None:
        self.rank: dict[str, int] = {}

    def order(self, docs: list[str]) -> list[int]:
        for d in docs:
            self.rank.setdefault(d, len(self.rank))
        return sorted(range(len(docs)), key=lambda i: self.rank[docs[i]])


class Layout(systems.System):
    """A prompt layout rendered here and sent straight to a llama-server."""

    key = "layout"

    def __init__(self, daemon: systems.Daemon, name: str, render: Callable[["Layout", Session, Any], list[dict]]):
        super().__init__(daemon)
        self.key = self.name = name
        self.render = render
        self.canonical = Canonical()
        self.conversations: dict[str, dict[str, Any]] = {}

    def request(self, session, step):
        url = f"{self.daemon.child_url}/v1/chat/completions"
        if step.messages is not None:
            return url, {"messages": step.messages}
        return url, {"messages": self.render(self, session, step)}


def _plain(ranking: bool = True):
    def render(layout: Layout, session: Session, step) -> list[dict]:
        system = _system(step.docs, list(range(len(step.docs))), ranking=ranking)
        return [{"role": "system", "content": system}, *step.history, {"role": "user", "content": step.question}]
    return render


def _reordered(ranking: bool = True, labels: str = "position", restate: int = 0):
    """Documents in first-seen order; `restate` > 0 writes the client's top
    documents again, in full, right before the question."""
    def render(layout: Layout, session: Session, step) -> list[dict]:
        order = layout.canonical.order(step.docs)
        system = _system(step.docs, order, ranking=ranking, labels=labels)
        question = step.question
        if restate:
            top = "".join(f"{d}\n" for d in step.docs[:restate])
            question = f"Most relevant:\n{top}\n{question}"
        return [{"role": "system", "content": system}, *step.history, {"role": "user", "content": question}]
    return render


def _conversation(mode: str):
    """contextpilotd's multi-turn layout: the first turn like a request with
    documents; later turns forward the history as it was sent (so earlier
    turns' documents stay where they were) and put this turn's documents in
    the last user message. mode "reference": documents sent earlier are
    named by label, new ones added (contextpilotd's layout); "repeat":
    every document of the turn written in full again;
    "plain-turn": the system message holds only the instruction and the
    last user message this turn's documents (no earlier documents at all)."""
    def render(layout: Layout, session: Session, step) -> list[dict]:
        conv = layout.conversations.get(session.id)
        if mode == "plain-turn":
            block = _turn_block(step.docs, list(range(len(step.docs))), {i: i + 1 for i in range(len(step.docs))})
            return [{"role": "system", "content": INSTRUCTION}, *step.history,
                    {"role": "user", "content": block + step.question}]
        if conv is None or not step.history:
            order = list(range(len(step.docs)))
            system = {"role": "system", "content": _system(step.docs, order)}
            labels = {step.docs[i]: pos + 1 for pos, i in enumerate(order)}
            messages = [system, {"role": "user", "content": step.question}]
            layout.conversations[session.id] = {"sent": messages, "labels": labels}
            return messages
        sent, labels = conv["sent"], conv["labels"]
        # The client's history is the earlier questions and the recorded
        # replies; what was sent stands in for every earlier message.
        previous_reply = step.history[-1]
        forwarded = [*sent, previous_reply]
        new = [d for d in step.docs if d not in labels]
        block = ""
        if mode == "reference":
            if new:
                block += "<documents>\n"
                for d in new:
                    labels[d] = len(labels) + 1
                    block += f"[{labels[d]}] {d}\n"
                block += "</documents>\n"
            old = [d for d in step.docs if d not in new]
            if old:
                block += f"Documents {', '.join(f'[{labels[d]}]' for d in old)} from earlier in this conversation also apply.\n"
            block += ("Read the documents in this importance ranking: " + " > ".join(str(labels[d]) for d in step.docs)
                      + RANKING_TAIL + "\n\n")
        else:
            for d in new:
                labels[d] = len(labels) + 1
            block = _turn_block(step.docs, list(range(len(step.docs))), {i: labels[d] for i, d in enumerate(step.docs)})
        last = {"role": "user", "content": block + step.question}
        conv["sent"] = [*forwarded, last]
        return conv["sent"]
    return render


def _turn_block(docs: list[str], order: list[int], label: dict[int, int]) -> str:
    lines = "".join(f"[{label[i]}] {docs[i]}\n" for i in order)
    ranking = " > ".join(str(label[i]) for i in range(len(docs)))
    return (f"<documents>\n{lines}</documents>\nRead the documents in this importance ranking: {ranking}"
            f"{RANKING_TAIL}\n\n")


# name -> (what it changes against plain, the workloads it applies to, renderer)
LAYOUTS: dict[str, tuple[str, tuple[str, ...], Callable]] = {
    "plain": ("the client's relevance order (A's layout)", ("rag", "chat"), _plain()),
    "no-ranking": ("relevance order without the importance-ranking line", ("rag", "chat"), _plain(ranking=False)),
    "reordered": ("first-seen order, [k] renumbered by position, ranking line", ("rag", "chat"), _reordered()),
    "reordered-no-ranking": ("first-seen order without the ranking line", ("rag", "chat"), _reordered(ranking=False)),
    "reordered-relevance-labels": ("first-seen order, each document keeps its relevance rank as label", ("rag", "chat"),
                                   _reordered(labels="relevance")),
    "reordered-restate-top": ("first-seen order, the client's top 2 documents restated before the question",
                              ("rag", "chat"), _reordered(restate=2)),
    "turn-docs": ("documents in the last user message after the history (no earlier turns' documents)", ("chat",),
                  _conversation("plain-turn")),
    "conversation-reference": ("history as sent, earlier documents named by label, new ones added", ("chat",),
                               _conversation("reference")),
    "conversation-repeat": ("history as sent, this turn's documents written in full in the last user message",
                            ("chat",), _conversation("repeat")),
}


# --- running -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/abc/quality.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="48 questions per workload (full: 200)")
    p.add_argument("--model", action="append", default=None,
                   help="a GGUF model; give it once per model (default: $MODEL and $GEMMA_MODEL)")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    p.add_argument("--contextpilotd", default=str(target / "release/contextpilotd"))
    p.add_argument("--workloads", default="rag,chat,agent")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"contextpilotd settings to run ({', '.join(SETTINGS)})")
    p.add_argument("--ablations", action="store_true", help="also run the layouts of LAYOUTS (one change each)")
    p.add_argument("--layouts", default="", help="only these layouts (comma-separated; implies --ablations)")
    p.add_argument("--slots", type=int, default=4, help="llama.slots of every llama-server (4)")
    p.add_argument("--ctx-per-slot", type=int, default=4096)
    p.add_argument("--gpu-layers", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--parallel-servers", action="store_true",
                   help="one client thread per llama-server instead of every request in turn (much faster where "
                        "the machine has the cores or a GPU; TTFT is then not comparable across systems)")
    p.add_argument("--seed", type=int, default=20261201)
    p.add_argument("--sessions", type=int, help="only the first N sessions of each workload (a smoke test)")
    p.add_argument("--extra-daemon-toml", default="", help="TOML appended to every daemon's config")
    p.add_argument("--out", help="JSON file (default target/bench/quality-<timestamp>.json)")
    args = p.parse_args(argv)
    args.models = args.model or [m for m in (os.environ.get("MODEL"), os.environ.get("GEMMA_MODEL")) if m]
    for what, path in [("--llama-server", args.llama_server), ("--contextpilotd", args.contextpilotd),
                       *(("--model", m) for m in args.models)]:
        if not path or not Path(path).is_file():
            p.error(f"{what} must name a file (got {path!r})")
    if not args.models:
        p.error("no model: give --model (or set $MODEL)")
    # Absolute: the daemons run in directories of their own.
    args.models = [str(Path(m).resolve()) for m in args.models]
    args.llama_server, args.contextpilotd = (str(Path(x).resolve()) for x in (args.llama_server, args.contextpilotd))
    unknown = [s for s in args.settings.split(",") if s and s not in SETTINGS]
    if unknown:
        p.error(f"--settings: unknown {', '.join(unknown)}")
    args.layout_names = [x for x in args.layouts.split(",") if x] or (list(LAYOUTS) if args.ablations else [])
    bad = [x for x in args.layout_names if x not in LAYOUTS]
    if bad:
        p.error(f"--layouts: unknown {', '.join(bad)} (known: {', '.join(LAYOUTS)})")
    return args


TEMPLATES = Path(__file__).resolve().parent / "templates"


def has_chat_template(model: str) -> bool:
    """Whether the GGUF's metadata (at its start, before the tensors)
    carries `tokenizer.chat_template`."""
    with open(model, "rb") as f:
        return b"tokenizer.chat_template" in f.read(64 << 20)


def model_extra(model: str) -> list[str]:
    """llama-server arguments a model needs. A GGUF without a chat template
    (Gemma 3 270M, a base model) gets llama-server's fallback (ChatML), to
    which a base model answers with echoes of the prompt, so it is served
    with a plain-text template of questions and answers, which it continues."""
    if not has_chat_template(model):
        return ["--chat-template-file", str(TEMPLATES / "plain-text.jinja")]
    return []


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    corpus, all_workloads = facts.generate(args.seed, sizes)
    chosen = {w: all_workloads[w][: args.sessions] for w in args.workloads.split(",") if w in all_workloads}
    scratch = Path(tempfile.mkdtemp(prefix="contextpilotd-quality-"))
    started = datetime.now(timezone.utc)
    doc: dict[str, Any] = {"started": started.isoformat(timespec="seconds"), "sizes": sizes, "seed": args.seed,
                           "corpus": corpus.describe(), "max_tokens": args.max_tokens, "models": [],
                           "settings": {s: SETTINGS[s] for s in args.settings.split(",") if s},
                           "layouts": {n: LAYOUTS[n][0] for n in args.layout_names},
                           "daemon_ablations": {n: a[0] for n, a in DAEMON_ABLATIONS.items()} if args.layout_names else {}}
    t0 = time.monotonic()
    for model in args.models:
        extra = model_extra(model)
        llama = {"binary": args.llama_server, "model": str(Path(model).resolve()), "slots": args.slots,
                 "ctx_per_slot": args.ctx_per_slot, "gpu_layers": args.gpu_layers, "threads": args.threads,
                 "extra_args": extra or None}
        entry: dict[str, Any] = {"model": Path(model).name, "workloads": {}}
        for wname, sessions in chosen.items():
            daemons: dict[str, systems.Daemon] = {}
            try:
                def start(key: str, toml: str) -> systems.Daemon:
                    d = systems.Daemon(Path(args.contextpilotd), scratch / f"{Path(model).stem}-{wname}-{key}", llama,
                                       "\n".join(x for x in ("[cost]\nmeasure = false\n", toml, args.extra_daemon_toml) if x))
                    daemons[key] = d.start()
                    return d
                sysobjs: dict[str, systems.System] = {"A": systems.Plain(start("A", ""))}
                for setting in args.settings.split(","):
                    if setting:
                        sysobjs[f"C:{setting}"] = systems.Daemonized(start(f"C-{setting}", SETTINGS[setting]))
                for name, (_, applies, toml) in DAEMON_ABLATIONS.items():
                    if args.layout_names and wname in applies:
                        sysobjs[f"C:{name}"] = systems.Daemonized(start(f"C-{name}", toml))
                layouts = [n for n in args.layout_names if wname in LAYOUTS[n][1]]
                if layouts:
                    server = start("layouts", "")
                    for n in layouts:
                        sysobjs[f"L:{n}"] = Layout(server, n, LAYOUTS[n][2])
                label = f"{Path(model).stem[:18]} {wname}"
                with contextlib.redirect_stdout(sys.stderr):
                    if args.parallel_servers:
                        per = run_per_server(sysobjs, sessions, args.max_tokens, label)
                    else:
                        # Each step to every system in turn, as the time bench does.
                        per = run_interleaved(sysobjs, sessions, args.max_tokens, label)
                query_logs = {k: d.query_log() for k, d in daemons.items() if k.startswith("C-")}
            finally:
                for d in daemons.values():
                    d.stop()
            questions = [s.question_meta for sess in sessions for s in sess.steps]
            for key, records in per.items():
                for rec, q in zip(records, questions):
                    rec["expected"] = q.expected
                    rec["attribute"] = q.attribute
                    rec["answer_rank"] = q.rank
                    rec["correct"] = bool(rec["ok"]) and facts.correct(rec["answer"], q)
            entry["workloads"][wname] = {
                "questions": len(questions),
                "summary": summarize(per),
                "reorder": {k: reorder_counts(log) for k, log in query_logs.items()},
                "records": per,
            }
        doc["models"].append(entry)
    doc["duration_s"] = round(time.monotonic() - t0, 1)
    shutil.rmtree(scratch, ignore_errors=True)
    return doc


def run_per_server(sysobjs: dict[str, systems.System], sessions: list[Session], max_tokens: int,
                   label: str) -> dict[str, list[dict]]:
    """One thread per llama-server (systems sharing one take turns on it),
    each sending its systems' steps in workload order."""
    import threading

    groups: dict[int, list[str]] = {}
    for key, system in sysobjs.items():
        groups.setdefault(id(system.daemon), []).append(key)
    out: dict[str, list[dict]] = {k: [] for k in sysobjs}
    progress = Progress(label, len(sysobjs) * sum(len(s.steps) for s in sessions))
    failures: list[BaseException] = []

    def work(keys: list[str]) -> None:
        try:
            with systems.client() as http:
                for session in sessions:
                    for index in range(len(session.steps)):
                        for key in keys:
                            out[key].append(systems.run_step(http, sysobjs[key], session, index, max_tokens))
                            progress.step()
        except BaseException as e:  # noqa: BLE001 - reported after the join
            failures.append(e)

    threads = [threading.Thread(target=work, args=(keys,), daemon=True) for keys in groups.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return out


def reorder_counts(log: list[dict]) -> dict[str, int]:
    """How often the daemon reordered documents, from its query log."""
    reordered = sum(1 for r in log if isinstance(r.get("reorder"), dict) and r["reorder"].get("reordered"))
    with_docs = sum(1 for r in log if isinstance(r.get("reorder"), dict))
    return {"requests_with_documents": with_docs, "reordered": reordered}


def summarize(per: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    base = per["A"]
    out = {}
    for key, recs in per.items():
        n = len(recs)
        k = sum(r["correct"] for r in recs)
        lost = sum(1 for a, r in zip(base, recs) if a["correct"] and not r["correct"])
        gained = sum(1 for a, r in zip(base, recs) if not a["correct"] and r["correct"])
        same = sum(1 for a, r in zip(base, recs) if report.normalize(a["answer"]) == report.normalize(r["answer"]))
        cached = sum(r["cache_n"] or 0 for r in recs)
        prompt = sum((r["cache_n"] or 0) + (r["prompt_n"] or 0) for r in recs)
        lo, hi = wilson(k, n)
        out[key] = {"n": n, "correct": k, "accuracy": k / n if n else None, "ci95": [lo, hi],
                    "lost_vs_A": lost, "gained_vs_A": gained, "p_vs_A": mcnemar_exact(lost, gained),
                    "same_answer_as_A": same / n if n else None, "failed": sum(1 for r in recs if not r["ok"]),
                    "cached_share": cached / prompt if prompt else None,
                    "ttft_p50_ms": report.percentile([r["ttft_ms"] for r in recs if r["ok"]], 0.5),
                    "prompt_ms_total": sum(r["prompt_ms"] or 0 for r in recs)}
    return out


def table(doc: dict[str, Any]) -> str:
    lines = []
    for entry in doc["models"]:
        for wname, w in entry["workloads"].items():
            lines.append(f"\n{entry['model']} · {wname} · {w['questions']} questions")
            lines.append(f"  {'system':<30} {'correct':>8} {'95% CI':>13} {'lost/gained vs A':>17} {'p':>6} "
                         f"{'same as A':>9} {'cached':>7} {'TTFT p50':>9}")
            for key, s in w["summary"].items():
                lo, hi = s["ci95"]
                vs = "" if key == "A" else f"{s['lost_vs_A']}/{s['gained_vs_A']}"
                p = "" if key == "A" else f"{s['p_vs_A']:.3f}"
                flag = " *" if key != "A" and s["p_vs_A"] < 0.05 and s["lost_vs_A"] > s["gained_vs_A"] else ""
                cached = report.NONE if s["cached_share"] is None else f"{100 * s['cached_share']:.1f}%"
                ttft = report.NONE if s["ttft_p50_ms"] is None else f"{s['ttft_p50_ms']:.0f} ms"
                lines.append(f"  {key:<30} {100 * s['accuracy']:7.1f}% [{100 * lo:4.1f},{100 * hi:5.1f}] {vs:>17} {p:>6} "
                             f"{100 * s['same_answer_as_A']:8.0f}% {cached:>7} {ttft:>9}{flag}")
            for key, counts in w.get("reorder", {}).items():
                lines.append(f"  {key}: reordered {counts['reordered']} of {counts['requests_with_documents']} requests with documents")
    lines.append("\n  * significantly fewer correct answers than A (exact McNemar, p < 0.05)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = run(args)
    out = Path(args.out) if args.out else ROOT / "target/bench" / f"quality-{doc['started'].replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    print(table(doc))
    print(f"\nJSON: {out}\ntook {doc['duration_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
