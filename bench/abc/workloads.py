"""Workloads of the A/B/C bench, generated deterministically from a seed.

The corpus is real English text that every Python ships: the docstrings of
the standard library's modules, read with `ast` from their source files
(nothing is imported, so no module runs). A module is a topic; its
docstring paragraphs are its documents (or, for long documents, its and its
submodules' paragraphs joined to the wanted length; see `build_corpus`).
Which modules and paragraphs are used depends only on the seed and on the
Python's standard library (its version and a hash of the corpus go into the
JSON report).

Three workloads, each a list of sessions; a session's steps run in order,
different sessions may run at the same time:

- rag: one session per query. A query picks a topic (Zipf over topics),
  retrieves k documents from it (Zipf popularity: the first documents of a
  topic are retrieved far more often), sometimes one from another topic, in
  a per-query relevance order.
- chat: one session per user (its conversation id). Each turn retrieves k
  memories from the user's two topics (overlapping from turn to turn) and
  asks a question. The assistant turns in the history are the recorded
  replies of the workload, so every system gets byte-identical requests.
- agent: one session per loop. A task, then tool calls whose results
  repeat: `search` returns JSON `results` (documents, overlapping between
  searches; by default half as many documents as a RAG query) and
  `read_file` returns lines of a standard library source file, which the
  loop reads again later. Every step sends the whole history.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Modules whose docstrings are too short or not prose are skipped by the
# paragraph filter; these few are skipped outright (test scaffolding, data).
_SKIP = {"this", "antigravity", "__hello__", "__phello__", "idlelib", "test", "lib2to3", "turtledemo"}


@dataclass
class Step:
    """One request: the caller's question with its documents (rag, chat) or
    the whole message list (agent)."""

    question: str
    docs: list[str] = field(default_factory=list)
    # Earlier messages of the conversation (chat) as the client holds them.
    history: list[dict[str, Any]] = field(default_factory=list)
    # The whole message list (agent), sent as it is.
    messages: list[dict[str, Any]] | None = None


@dataclass
class Session:
    id: str
    workload: str
    steps: list[Step]


# --- corpus -----------------------------------------------------------------


def _stdlib_sources() -> list[tuple[str, Path]]:
    """(module name, source file) of every pure-Python stdlib module, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(getattr(sys, "stdlib_module_names", ()))
    out = []
    for name in names:
        if name in _SKIP or name.startswith("_"):
            continue
        for candidate in (root / f"{name}.py", root / name / "__init__.py"):
            if candidate.is_file():
                out.append((name, candidate))
                break
    return out


def _paragraphs(source: str, min_chars: int, max_chars: int) -> list[str]:
    """Docstring paragraphs of a module (module, classes, functions), in
    source order, whitespace collapsed, prose only, within the size bounds."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    for node in nodes:
        if node is not tree and node.name.startswith("_"):
            continue  # private helpers: their docs are about internals
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        label = "" if node is tree else f"{node.name}: "
        for para in doc.split("\n\n"):
            text = " ".join(para.split())
            if not text or ">>>" in text or text.count("  ") or not text[0].isalpha():
                continue
            if sum(c.isalpha() or c == " " for c in text) < 0.85 * len(text):
                continue  # tables, code, signatures
            if len(text) > max_chars:
                # Cut at the last sentence end that fits, else skip.
                cut = text[:max_chars].rfind(". ")
                if cut < min_chars:
                    continue
                text = text[: cut + 1]
            if len(text) >= min_chars:
                docs.append(label + text)
    # Exact duplicates (inherited docstrings) once.
    seen: set[str] = set()
    return [d for d in docs if not (d in seen or seen.add(d))]


@dataclass
class Corpus:
    topics: dict[str, list[str]]  # module name -> its documents, in source order
    sources: dict[str, Path]  # module name -> source file (for read_file)
    digest: str  # sha256 of the documents, for the report
    method: str = "paragraphs"  # how documents were cut (see build_corpus)

    def describe(self) -> dict[str, Any]:
        docs = [d for ds in self.topics.values() for d in ds]
        return {
            "source": f"docstrings of the Python {sys.version.split()[0]} standard library",
            "documents_are": self.method,
            "topics": len(self.topics),
            "documents": len(docs),
            "document_chars_mean": round(sum(map(len, docs)) / len(docs)) if docs else None,
            "sha256": self.digest,
        }


def build_corpus(seed: int, topics: int, doc_chars: int, docs_per_topic: int = 16) -> Corpus:
    """`topics` modules (chosen by the seed among those with at least
    `docs_per_topic` usable paragraphs), each with its first
    `docs_per_topic` paragraphs of about `doc_chars` characters (between
    half and twice that).

    Long documents or many per topic (a GPU's prefill wants ~400-character
    documents, 32 to a topic) are more than single paragraphs of single
    modules give: then every topic is a top-level module or package with
    its submodules, and its documents are consecutive docstring paragraphs
    joined to about `doc_chars` (see `_combined`). That second way is taken
    only when the first cannot fill the topics, so the sizes that fit keep
    the corpus they always had."""
    rng = random.Random(seed)
    candidates = []
    for name, path in _stdlib_sources():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        paras = _paragraphs(source, doc_chars // 2, doc_chars * 2)
        if len(paras) >= docs_per_topic:
            candidates.append((name, path, paras[:docs_per_topic]))
    method = "paragraphs"
    if len(candidates) < topics:
        method = "combined paragraphs of a module and its submodules"
        combined = []
        for name, path in _stdlib_sources():
            docs = _combined(path, doc_chars)
            if len(docs) >= docs_per_topic:
                combined.append((name, path, docs[:docs_per_topic]))
        if len(combined) < topics:
            raise SystemExit(
                f"the standard library has only {max(len(candidates), len(combined))} modules with {docs_per_topic} "
                f"documents of about {doc_chars} characters; ask for fewer topics, fewer documents per topic "
                "(--topic-docs) or shorter documents (--doc-chars)")
        candidates = combined
    chosen = rng.sample(candidates, topics)
    digest = hashlib.sha256(json.dumps([(n, p) for n, _, p in chosen]).encode()).hexdigest()
    return Corpus(
        topics={name: paras for name, _, paras in chosen},
        sources={name: path for name, path, _ in chosen},
        digest=digest,
        method=method,
    )


# Package folders that hold tests or tools rather than the package's API.
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}


def _package_files(path: Path) -> list[Path]:
    """A module's source file, or a package's `__init__.py` followed by its
    public submodules (recursively, sorted)."""
    if path.name != "__init__.py":
        return [path]
    subs = sorted(
        p for p in path.parent.rglob("*.py")
        if p != path and not p.name.startswith("_") and not (_SKIP_DIRS & set(p.relative_to(path.parent).parts[:-1]))
    )
    return [path, *subs]


def _combined(path: Path, doc_chars: int) -> list[str]:
    """Documents of about `doc_chars` characters for one topic: each
    source file's docstring paragraphs (the short ones too) in source
    order, consecutive ones joined until the document reaches three
    quarters of `doc_chars` (the last paragraph's overshoot brings the mean
    near `doc_chars`), never past twice it; shorter than half is dropped."""
    docs: list[str] = []
    for file in _package_files(path):
        try:
            source = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        current = ""
        for para in _paragraphs(source, 40, doc_chars * 2):
            if current and len(current) + 1 + len(para) > doc_chars * 2:
                if len(current) >= doc_chars // 2:
                    docs.append(current)
                current = ""
            current = f"{current} {para}" if current else para
            if len(current) >= doc_chars * 3 // 4:
                docs.append(current)
                current = ""
        if len(current) >= doc_chars // 2:
            docs.append(current)
    seen: set[str] = set()
    return [d for d in docs if not (d in seen or seen.add(d))]


# --- helpers ------------------------------------------------------------------


def _zipf_weights(n: int, s: float = 1.0) -> list[float]:
    return [1.0 / (rank + 1) ** s for rank in range(n)]


def _retrieve(rng: random.Random, pool: list[str], k: int, weights: list[float]) -> list[str]:
    k = min(k, len(pool))
    chosen: list[str] = []
    while len(chosen) < k:
        doc = rng.choices(pool, weights=weights)[0]
        if doc not in chosen:
            chosen.append(doc)
    return chosen


def _subject(doc: str, topic: str) -> str:
    """What a question about `doc` names: the function or class it documents,
    else the module."""
    head = doc.split(": ", 1)[0]
    return f"{topic}.{head}" if head != doc and " " not in head else f"the {topic} module"


# --- the three workloads --------------------------------------------------------


def rag(corpus: Corpus, rng: random.Random, queries: int, k: int) -> list[Session]:
    topics = list(corpus.topics)
    topic_w = _zipf_weights(len(topics), 1.1)
    sessions = []
    for q in range(queries):
        topic = rng.choices(topics, weights=topic_w)[0]
        pool = corpus.topics[topic]
        docs = _retrieve(rng, pool, k, _zipf_weights(len(pool)))
        if rng.random() < 0.3 and len(topics) > 1:
            other = rng.choice([t for t in topics if t != topic])
            docs[-1] = rng.choice(corpus.topics[other][:4])
            if len(set(docs)) < len(docs):
                docs = list(dict.fromkeys(docs))
        rng.shuffle(docs)  # retrieval order: relevance differs per query
        question = f"What does the documentation say about {_subject(docs[0], topic)}?"
        sessions.append(Session(f"rag-{q}", "rag", [Step(question, docs)]))
    return sessions


def _recorded_reply(doc: str) -> str:
    """The assistant's recorded reply in a conversation: the first sentence
    of the most relevant document."""
    return doc.split(": ", 1)[-1].split(". ")[0].rstrip(".") + "."


_FOLLOW_UPS = [
    "And how is {s} used in practice?",
    "What are the pitfalls of {s}?",
    "Give one example involving {s}.",
]


def topical_rag(corpus: Corpus, rng: random.Random, queries: int, k: int, cross: float = 0.3,
                follow_ups: int = 0) -> list[Session]:
    """RAG over topical sessions, for the routing bench: every topic gets
    the same number of queries (give or take one), in a shuffled order so
    that the queries of one topic arrive interleaved with the others'. A
    query's documents are drawn as `rag` draws them: k from its topic (Zipf
    popularity), with probability `cross` the last one from another topic,
    in a per-query relevance order. With `follow_ups`, each query is a
    session: the user asks that many follow-up questions about the same
    retrieved documents, the conversation so far (with a recorded reply)
    sent along, as a RAG chat client does."""
    topics = list(corpus.topics)
    order = [topics[q % len(topics)] for q in range(queries)]
    rng.shuffle(order)
    sessions = []
    for q, topic in enumerate(order):
        pool = corpus.topics[topic]
        docs = _retrieve(rng, pool, k, _zipf_weights(len(pool)))
        if rng.random() < cross and len(topics) > 1:
            other = rng.choice([t for t in topics if t != topic])
            docs[-1] = rng.choice(corpus.topics[other][:4])
            docs = list(dict.fromkeys(docs))
        rng.shuffle(docs)
        subject = _subject(docs[0], topic)
        question = f"What does the documentation say about {subject}?"
        steps = [Step(question, docs)]
        history: list[dict[str, Any]] = []
        reply = _recorded_reply(docs[0])
        for f in range(follow_ups):
            history += [{"role": "user", "content": steps[-1].question}, {"role": "assistant", "content": reply}]
            steps.append(Step(_FOLLOW_UPS[f % len(_FOLLOW_UPS)].format(s=subject), docs, history=list(history)))
        sessions.append(Session(f"rag-{q}-{topic}", "rag", steps))
    return sessions


_CHAT_ASKS = [
    "Remind me what {s} is for.",
    "How does {s} behave?",
    "What should I watch out for with {s}?",
    "Summarise {s} in one sentence.",
    "Is {s} what I need here?",
]


def chat(corpus: Corpus, rng: random.Random, users: int, turns: int, k: int) -> list[Session]:
    topics = list(corpus.topics)
    sessions = []
    for u in range(users):
        mine = rng.sample(topics, min(2, len(topics)))
        pool = [d for t in mine for d in corpus.topics[t]]
        owner = {d: t for t in mine for d in corpus.topics[t]}
        weights = _zipf_weights(len(pool), 0.8)
        history: list[dict[str, Any]] = []
        steps = []
        for t in range(turns):
            docs = _retrieve(rng, pool, k, weights)
            rng.shuffle(docs)
            subject = _subject(docs[0], owner[docs[0]])
            question = rng.choice(_CHAT_ASKS).format(s=subject)
            steps.append(Step(question, docs, history=list(history)))
            reply = _recorded_reply(docs[0])
            history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        sessions.append(Session(f"user-{u}", "chat", steps))
    return sessions


AGENT_SYSTEM = (
    "You are a coding agent working in a Python checkout. Tools: search(query) returns documentation "
    "passages as JSON; read_file(path, start, end) returns numbered source lines. Call one tool per step, "
    "then answer briefly."
)


def _read_file(path: Path, start: int, lines: int) -> str:
    text = path.read_text(encoding="utf-8").splitlines()
    chunk = text[start : start + lines]
    return "\n".join(f"{start + i + 1:5d}| {line}" for i, line in enumerate(chunk))


def agent(corpus: Corpus, rng: random.Random, loops: int, steps: int, k: int, file_lines: int) -> list[Session]:
    """Each loop: a task, then `steps` tool calls. Every third call reads a
    file again or repeats a search, as agents do; searches overlap."""
    topics = list(corpus.topics)
    sessions = []
    for n in range(loops):
        topic = rng.choice(topics)
        pool = corpus.topics[topic]
        path = corpus.sources[topic]
        rel = f"Lib/{path.parent.name + '/' if path.name == '__init__.py' else ''}{path.name}"
        total = len(path.read_text(encoding="utf-8").splitlines())
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": AGENT_SYSTEM},
            {"role": "user", "content": f"Task {n}: find out how {topic} is used and fix the failing call."},
        ]
        out = []
        calls: list[tuple[str, dict[str, Any], str]] = []
        for s in range(steps):
            if s % 3 == 2 and calls:
                name, args, result = calls[rng.randrange(len(calls))]  # the agent looks again
            elif s % 2 == 0:
                docs = _retrieve(rng, pool, k, _zipf_weights(len(pool)))
                name, args = "search", {"query": f"{topic} {rng.choice(['usage', 'errors', 'example', 'options'])}"}
                result = json.dumps({"results": [{"text": d} for d in docs]}, ensure_ascii=False)
            else:
                start = rng.randrange(max(1, total - file_lines))
                name, args = "read_file", {"path": rel, "start": start + 1, "end": start + file_lines}
                result = _read_file(path, start, file_lines)
            calls.append((name, args, result))
            call_id = f"call_{n}_{s}"
            messages = messages + [
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]},
                {"role": "tool", "tool_call_id": call_id, "content": result},
            ]
            out.append(Step(f"step {s}", messages=[dict(m) for m in messages]))
        sessions.append(Session(f"agent-{n}", "agent", out))
    return sessions


def default_sizes(sizes: dict[str, int]) -> dict[str, int]:
    """`sizes` with the derived ones filled in where not given: chat turns
    retrieve as many documents as a RAG query, an agent's search returns
    half as many, and a topic holds twice as many as a query retrieves (at
    least 16), so that queries of one topic share some documents, not all."""
    out = dict(sizes)
    out.setdefault("chat_docs", out["k"])
    out.setdefault("agent_docs", max(1, out["k"] // 2))
    out.setdefault("topic_docs", max(16, 2 * out["k"], out["chat_docs"], out["agent_docs"]))
    return out


def generate(seed: int, sizes: dict[str, int]) -> tuple[Corpus, dict[str, list[Session]]]:
    """The corpus and every workload for `seed` and `sizes` (keys: topics,
    doc_chars, queries, k, users, turns, loops, steps, file_lines, and the
    optional chat_docs, agent_docs, topic_docs of `default_sizes`)."""
    sizes = default_sizes(sizes)
    corpus = build_corpus(seed, sizes["topics"], sizes["doc_chars"], sizes["topic_docs"])
    # One generator per workload, so changing one size leaves the others as they were.
    workloads = {
        "rag": rag(corpus, random.Random(f"{seed}-rag"), sizes["queries"], sizes["k"]),
        "chat": chat(corpus, random.Random(f"{seed}-chat"), sizes["users"], sizes["turns"], sizes["chat_docs"]),
        "agent": agent(corpus, random.Random(f"{seed}-agent"), sizes["loops"], sizes["steps"], sizes["agent_docs"], sizes["file_lines"]),
    }
    return corpus, {name: sessions for name, sessions in workloads.items() if sessions}


if __name__ == "__main__":  # a look at what is generated
    corpus, wl = generate(int(os.environ.get("SEED", "1")), dict(topics=6, doc_chars=140, queries=3, k=4, users=1, turns=2, loops=1, steps=3, file_lines=12))
    print(json.dumps(corpus.describe(), indent=1))
    for name, sessions in wl.items():
        print(f"== {name}")
        for s in sessions:
            for st in s.steps:
                print(json.dumps(st.__dict__, ensure_ascii=False)[:600])
