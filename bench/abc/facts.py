"""Known-answer workloads for the quality eval (bench/abc/quality.py).

Every question is answered by a fact that exactly one document states, so
an answer is checked automatically. The corpus is generated from the seed:
projects (topics) of components, each component described by one document
(a "card") that gives its port, its maintainer and how many days it keeps
its logs. The other documents of a project state the same three kinds of
fact for other components, so a model that reads the wrong document gives
a wrong value: the documents around the answer are real distractors, and
their order and layout can change the answer.

The three workloads have the shapes of bench/abc/workloads.py:

- rag: one request per question; k documents of one project (Zipf
  popularity, so queries share documents), sometimes one from another
  project, in a retriever's relevance order: the answer's document is first
  half of the time, else second or lower, as a real retriever ranks.
- chat: one conversation per user; each turn retrieves k memories
  (overlapping from turn to turn) and asks about one of them; the recorded
  assistant replies are the correct answers, so every system gets the same
  history.
- agent: one loop per user task; each step the user asks, the agent calls
  `search`, the tool returns documents as JSON, and the request asks for the
  answer; every third step asks about an earlier component again and gets
  the identical search result (which block dedup rewrites).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from workloads import Session, Step

_SYLLABLES = ["lar", "kin", "vor", "mel", "dra", "quin", "tas", "ori", "bel", "zen", "cal", "mir", "sor", "pel",
              "dun", "fen", "gal", "hol", "jor", "ket", "lum", "nar", "pim", "rav", "sil", "tor", "ulm", "vex",
              "wim", "yar", "bro", "cen", "dax", "ebb", "fio", "gru", "hap", "ilk", "jun", "kor"]
_FIRST = ["Priya", "Tomas", "Amara", "Kenji", "Lucia", "Omar", "Freya", "Dmitri", "Aisha", "Mateo", "Ingrid",
          "Rahul", "Chloe", "Tobias", "Leila", "Marcus", "Yuki", "Nadia", "Felix", "Zara", "Hugo", "Selin",
          "Pavel", "Elena", "Jonas", "Mira", "Andre", "Kofi", "Signe", "Ravi"]
_LAST = ["Natarajan", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Haddad", "Kowalski", "Ferreira", "Brennan",
         "Schulz", "Castillo", "Ivanova", "Mensah", "Dubois", "Sorensen", "Aziz", "Nakamura", "Petrov", "Oyelaran",
         "Lefebvre", "Bianchi", "Gupta", "Holm", "Vargas", "Keller", "Novak", "Adeyemi", "Fischer", "Rossi", "Varga"]
_ROLES = ["billing", "search", "login", "queue", "cache", "metrics", "scheduler", "mail", "gateway", "indexer",
          "export", "notification", "backup", "audit", "upload", "report", "payment", "session", "config", "routing"]
_CARDS = [
    "{name} is the {role} service of the {project} platform. It listens on port {port}, is maintained by {owner}, "
    "and keeps its logs for {days} days.",
    "The {role} component of the {project} platform is called {name}. {owner} maintains it; it serves on port "
    "{port} and retains its logs for {days} days.",
    "{name} handles {role} for the {project} platform. Port: {port}. Maintainer: {owner}. Log retention: {days} days.",
    "In the {project} platform, {role} runs in {name}, which {owner} maintains. {name} accepts connections on port "
    "{port} and deletes logs older than {days} days.",
]
# Sentences that lengthen a card to the wanted size without adding a fact a
# question asks about.
_FILLER = [
    "It was moved to the new cluster last spring.", "Its dashboards are linked from the team wiki.",
    "Deployments go out on Tuesdays after the review.", "It is written in Go and built with the shared pipeline.",
    "Alerts page the on-call engineer of the week.", "Its configuration lives in the platform repository.",
    "A staging copy runs beside it for load tests.", "It depends on the shared database cluster.",
    "Its API is versioned and documented in the handbook.", "Capacity is reviewed at the end of each quarter.",
    "It restarts itself when its health check fails.", "Access is granted through the platform's groups.",
]
QUESTIONS = {
    "port": "Which port does {name} listen on?",
    "owner": "Who maintains {name}?",
    "days": "For how many days does {name} keep its logs?",
}
REPLIES = {
    "port": "{name} listens on port {port}.",
    "owner": "{name} is maintained by {owner}.",
    "days": "{name} keeps its logs for {days} days.",
}


@dataclass
class Card:
    name: str
    project: str
    role: str
    port: int
    owner: str
    days: int
    text: str

    def answer(self, attribute: str) -> str:
        return str(getattr(self, attribute))


@dataclass
class FactCorpus:
    topics: dict[str, list[Card]]  # project -> its cards (popularity order)
    digest: str

    def describe(self) -> dict[str, Any]:
        cards = [c for cs in self.topics.values() for c in cs]
        return {"source": "generated fact cards (bench/abc/facts.py)", "topics": len(self.topics),
                "documents": len(cards), "document_chars_mean": round(sum(len(c.text) for c in cards) / len(cards)),
                "sha256": self.digest}


@dataclass
class Question:
    """What a step asks and how its answer is checked."""

    attribute: str
    expected: str  # the value the answer must contain
    subject: str  # the component asked about
    rank: int  # 1-based position of the answer's document in the client's (relevance) order, 0 if none


def correct(answer: str, question: Question) -> bool:
    """Whether `answer` states the expected value: the number as a whole
    number, or the maintainer's surname as a word (case-insensitive). Only
    the answer's first line counts: a base model goes on to write new
    questions and answers of its own."""
    answer = answer.strip().split("\n", 1)[0]
    if question.attribute == "owner":
        surname = question.expected.split()[-1]
        return re.search(rf"\b{re.escape(surname)}\b", answer, re.IGNORECASE) is not None
    return re.search(rf"(?<!\d){re.escape(question.expected)}(?!\d)", answer) is not None


def build(seed: int, topics: int, per_topic: int, doc_chars: int) -> FactCorpus:
    rng = random.Random(f"{seed}-facts")
    names: set[str] = set()

    def new_name() -> str:
        while True:
            name = "".join(rng.sample(_SYLLABLES, 2)).capitalize()
            if name not in names:
                names.add(name)
                return name

    out: dict[str, list[Card]] = {}
    for _ in range(topics):
        project = new_name()
        roles = rng.sample(_ROLES, min(per_topic, len(_ROLES)))
        roles += [rng.choice(_ROLES) for _ in range(per_topic - len(roles))]
        ports = rng.sample(range(2000, 9999), per_topic)
        days = rng.sample(range(7, 99), per_topic)
        owners = rng.sample([f"{f} {l}" for f in _FIRST for l in _LAST], per_topic)
        # Surnames are unique within a project, so an answer names one card.
        while len({o.split()[-1] for o in owners}) < per_topic:
            owners = rng.sample([f"{f} {l}" for f in _FIRST for l in _LAST], per_topic)
        cards = []
        for i in range(per_topic):
            fields = dict(name=new_name(), project=project, role=roles[i], port=ports[i], owner=owners[i], days=days[i])
            text = rng.choice(_CARDS).format(**fields)
            filler = rng.sample(_FILLER, len(_FILLER))
            while filler and len(text) + len(filler[0]) + 1 <= doc_chars:
                text += " " + filler.pop()
            cards.append(Card(text=text, **fields))
        out[project] = cards
    digest = hashlib.sha256(json.dumps({p: [c.text for c in cs] for p, cs in out.items()}).encode()).hexdigest()
    return FactCorpus(out, digest)


def _zipf(n: int, s: float) -> list[float]:
    return [1.0 / (r + 1) ** s for r in range(n)]


def _retrieve(rng: random.Random, target: Card, pool: list[Card], k: int, extra: list[Card] | None = None) -> list[Card]:
    """k cards in a retriever's relevance order: the target and k-1 others
    of its pool (popular ones more often), one from `extra` 30 % of the
    time; the target ranks first half of the time, second a quarter, lower
    otherwise."""
    others = [c for c in pool if c is not target]
    weights = _zipf(len(others), 1.0)
    chosen: list[Card] = []
    while len(chosen) < min(k - 1, len(others)):
        card = rng.choices(others, weights=weights)[0]
        if card not in chosen:
            chosen.append(card)
    if extra and chosen and rng.random() < 0.3:
        chosen[-1] = rng.choice(extra[:4])
    rng.shuffle(chosen)
    roll = rng.random()
    rank = 0 if roll < 0.5 else 1 if roll < 0.75 else rng.randrange(2, len(chosen) + 1)
    chosen.insert(min(rank, len(chosen)), target)
    return chosen


def _ask(rng: random.Random, card: Card, docs: list[Card], attribute: str | None = None) -> tuple[str, Question]:
    attribute = attribute or rng.choice(list(QUESTIONS))
    q = Question(attribute, card.answer(attribute), card.name, docs.index(card) + 1 if card in docs else 0)
    return QUESTIONS[attribute].format(name=card.name), q


def _reply(card: Card, attribute: str) -> str:
    return REPLIES[attribute].format(name=card.name, port=card.port, owner=card.owner, days=card.days)


@dataclass
class QStep(Step):
    question_meta: Question | None = None


def rag(corpus: FactCorpus, rng: random.Random, queries: int, k: int) -> list[Session]:
    projects = list(corpus.topics)
    topic_w = _zipf(len(projects), 1.1)
    sessions = []
    for q in range(queries):
        project = rng.choices(projects, weights=topic_w)[0]
        pool = corpus.topics[project]
        target = rng.choices(pool, weights=_zipf(len(pool), 0.8))[0]
        others = [c for p in projects if p != project for c in corpus.topics[p]]
        docs = _retrieve(rng, target, pool, k, others)
        text, meta = _ask(rng, target, docs)
        sessions.append(Session(f"rag-{q}", "rag", [QStep(text, [d.text for d in docs], question_meta=meta)]))
    return sessions


def chat(corpus: FactCorpus, rng: random.Random, users: int, turns: int, k: int) -> list[Session]:
    projects = list(corpus.topics)
    sessions = []
    for u in range(users):
        mine = rng.sample(projects, min(2, len(projects)))
        pool = [c for p in mine for c in corpus.topics[p]]
        rng.shuffle(pool)
        history: list[dict[str, Any]] = []
        asked: set[str] = set()
        steps = []
        for _ in range(turns):
            fresh = [c for c in pool if c.name not in asked] or pool
            target = rng.choices(fresh, weights=_zipf(len(fresh), 0.6))[0]
            asked.add(target.name)
            docs = _retrieve(rng, target, pool, k)
            text, meta = _ask(rng, target, docs)
            steps.append(QStep(text, [d.text for d in docs], history=list(history), question_meta=meta))
            history += [{"role": "user", "content": text},
                        {"role": "assistant", "content": _reply(target, meta.attribute)}]
        sessions.append(Session(f"user-{u}", "chat", steps))
    return sessions


AGENT_SYSTEM = (
    "You are an operations assistant for a company's internal platforms. Tool: search(query) returns "
    "documentation passages as JSON. Search, then answer the user's question briefly from the results."
)


def agent(corpus: FactCorpus, rng: random.Random, loops: int, steps: int, k: int) -> list[Session]:
    projects = list(corpus.topics)
    sessions = []
    for n in range(loops):
        project = rng.choice(projects)
        pool = corpus.topics[project]
        messages: list[dict[str, Any]] = [{"role": "system", "content": AGENT_SYSTEM}]
        out = []
        searches: list[tuple[Card, str, list[Card]]] = []
        asked: set[tuple[str, str]] = set()
        for s in range(steps):
            if s % 3 == 2 and searches:
                # The user comes back to an earlier component: the agent runs
                # the same search and gets the same result.
                target, query, docs = searches[rng.randrange(len(searches))]
                left = [a for a in QUESTIONS if (target.name, a) not in asked] or list(QUESTIONS)
                attribute = rng.choice(left)
            else:
                searched = {t.name for t, _, _ in searches}
                target = rng.choice([c for c in pool if c.name not in searched] or pool)
                docs = _retrieve(rng, target, pool, k)
                query = f"{target.name} {rng.choice(['service', 'owner', 'settings', 'runbook'])}"
                attribute = None
                searches.append((target, query, docs))
            text, meta = _ask(rng, target, docs, attribute)
            asked.add((target.name, meta.attribute))
            call_id = f"call_{n}_{s}"
            # Pretty-printed, as many tools print JSON: one line per result,
            # so a repeated result is a block that block dedup finds.
            result = json.dumps({"results": [{"text": d.text} for d in docs]}, ensure_ascii=False, indent=1)
            said = f"I am auditing the {project} platform. {text}" if s == 0 else text
            messages = messages + [
                {"role": "user", "content": said},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function",
                     "function": {"name": "search", "arguments": json.dumps({"query": query})}}]},
                {"role": "tool", "tool_call_id": call_id, "content": result},
            ]
            out.append(QStep(text, messages=[dict(m) for m in messages], question_meta=meta))
            messages = messages + [{"role": "assistant", "content": _reply(target, meta.attribute)}]
        sessions.append(Session(f"agent-{n}", "agent", out))
    return sessions


def generate(seed: int, sizes: dict[str, int]) -> tuple[FactCorpus, dict[str, list[Session]]]:
    """The corpus and the three known-answer workloads (keys of `sizes`:
    topics, topic_docs, doc_chars, queries, k, users, turns, chat_docs,
    loops, steps, agent_docs)."""
    corpus = build(seed, sizes["topics"], sizes["topic_docs"], sizes["doc_chars"])
    return corpus, {
        "rag": rag(corpus, random.Random(f"{seed}-rag"), sizes["queries"], sizes["k"]),
        "chat": chat(corpus, random.Random(f"{seed}-chat"), sizes["users"], sizes["turns"], sizes["chat_docs"]),
        "agent": agent(corpus, random.Random(f"{seed}-agent"), sizes["loops"], sizes["steps"], sizes["agent_docs"]),
    }


if __name__ == "__main__":
    corpus, wl = generate(1, dict(topics=3, topic_docs=8, doc_chars=160, queries=2, k=4, users=1, turns=2,
                                  chat_docs=4, loops=1, steps=3, agent_docs=3))
    print(json.dumps(corpus.describe(), indent=1))
    for name, sessions in wl.items():
        print(f"== {name}")
        for s in sessions:
            for st in s.steps:
                print(st.question_meta, json.dumps({"q": st.question, "docs": st.docs, "history": st.history,
                                                     "messages": st.messages}, ensure_ascii=False)[:700])
