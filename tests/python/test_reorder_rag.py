"""A generated RAG workload, run twice on identical llama-servers: once
straight to llama-server with the documents in retrieval order (what a client
does without contextpilotd), once through contextpilotd with `documents`.
The share of prompt tokens llama.cpp served from its KV cache must be at least
3x higher through contextpilotd. Both shares come from llama-server's own
counters (`timings.cache_n`, `timings.prompt_n`), never from time.
"""

from __future__ import annotations

import random

import httpx

from e2e import Daemon

SEED = 20261122
QUERIES = 30

TOPICS = {
    "volcanoes": ["basalt", "magma chamber", "ash plume", "caldera", "lava tube", "fumarole"],
    "rivers": ["delta", "floodplain", "oxbow lake", "tributary", "estuary", "rapids"],
    "bridges": ["suspension cable", "pier", "truss", "arch", "deck", "abutment"],
}
# Some topics are asked about far more often than others.
TOPIC_WEIGHTS = {"volcanoes": 6, "rivers": 3, "bridges": 1}
PLACES = ["Lima", "Oslo", "Kyoto", "Quito", "Perth", "Accra", "Tartu", "Cusco"]


def corpus(rng: random.Random) -> dict[str, list[str]]:
    """Twelve short documents per topic, deterministic for the seed."""
    out = {}
    for topic, nouns in TOPICS.items():
        docs = []
        for i in range(12):
            noun = nouns[i % len(nouns)]
            place = PLACES[(i * 3 + len(topic)) % len(PLACES)]
            year = 1850 + rng.randrange(170)
            docs.append(f"{topic} {i}: {noun}, {place}, {year}.")
        out[topic] = docs
    return out


def workload(rng: random.Random) -> list[tuple[str, list[str]]]:
    """(question, documents in retrieval order): 8-10 documents from the
    query's topic, popular documents (Zipf) retrieved more often, sometimes
    one from another topic, in a per-query relevance order."""
    docs = corpus(rng)
    topics = list(TOPICS)
    queries = []
    for q in range(QUERIES):
        topic = rng.choices(topics, weights=[TOPIC_WEIGHTS[t] for t in topics])[0]
        pool = docs[topic]
        weights = [1.0 / (rank + 1) for rank in range(len(pool))]
        chosen: list[str] = []
        want = rng.randint(8, 10)
        while len(chosen) < want:
            doc = rng.choices(pool, weights=weights)[0]
            if doc not in chosen:
                chosen.append(doc)
        if rng.random() < 0.3:
            other = rng.choice([t for t in topics if t != topic])
            chosen[-1] = rng.choice(docs[other][:4])
        rng.shuffle(chosen)  # retrieval order: relevance differs per query
        queries.append((f"Q{q}: where is the {topic} data?", chosen))
    return queries


def plain_system(docs: list[str]) -> str:
    """The same prompt layout contextpilotd renders, in retrieval order."""
    lines = "".join(f"[{i + 1}] {d}\n" for i, d in enumerate(docs))
    ranking = " > ".join(str(i + 1) for i in range(len(docs)))
    return (
        "Answer the question based on the provided documents.\n\n<documents>\n"
        f"{lines}</documents>\n\nRead the documents in this importance ranking: {ranking}\n"
        "Prioritize information from higher-ranked documents."
    )


def cache_share(timings: list[dict]) -> float:
    cached = sum(t["cache_n"] for t in timings)
    total = sum(t["cache_n"] + t["prompt_n"] for t in timings)
    return cached / total


def test_reordering_serves_at_least_three_times_more_prompt_from_cache(make_daemon):
    queries = workload(random.Random(SEED))
    assert all(8 <= len(docs) <= 10 for _, docs in queries)

    # A: llama-server alone (the child of a first daemon, called directly,
    # without id_slot: llama-server routes by prompt similarity itself; so
    # that child runs without a key of its own).
    plain: Daemon = make_daemon(llama={"child_key": False})
    child = f"http://127.0.0.1:{plain.status()['child']['port']}"
    direct = []
    with httpx.Client(timeout=120) as http:
        for question, docs in queries:
            r = http.post(
                f"{child}/v1/chat/completions",
                json={
                    "messages": [
                        {"role": "system", "content": plain_system(docs)},
                        {"role": "user", "content": question},
                    ],
                    "max_tokens": 1,
                    "temperature": 0,
                },
            )
            assert r.status_code == 200, r.text
            direct.append(r.json()["timings"])
    plain.stop()

    # B: the same workload through a second, identical daemon.
    d: Daemon = make_daemon()
    through = []
    with httpx.Client(timeout=120) as http:
        for question, docs in queries:
            r = http.post(
                f"{d.base_url}/chat/completions",
                json={
                    "messages": [{"role": "user", "content": question}],
                    "documents": docs,
                    "max_tokens": 1,
                    "temperature": 0,
                },
            )
            assert r.status_code == 200, r.text
            body = r.json()
            through.append(body["timings"])
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == body["timings"]["cache_n"]

    share_direct, share_through = cache_share(direct), cache_share(through)
    print(f"\nprompt tokens from cache: llama-server alone {share_direct:.1%}, "
          f"through contextpilotd {share_through:.1%} ({share_through / share_direct:.1f}x)")
    assert share_through >= 3 * share_direct, (share_direct, share_through)

    # Every request was reordered and recorded with its prediction.
    lines = d.wait_query_log(QUERIES)
    assert len(lines) == QUERIES
    for line in lines:
        r = line["reorder"]
        assert 8 <= r["documents"] <= 10
        assert r["slot_choice"] in ("cached-prefix", "ram-cache", "header", "lru")
        assert isinstance(r["predicted_reused_tokens"], int)
    stats = httpx.get(f"{d.root}/stats").json()["reorder"]
    assert stats["requests"] == QUERIES
    assert stats["actual_reused_tokens"] == sum(t["cache_n"] for t in through)


def test_a_conversation_keeps_its_history_cached_and_references_sent_documents(make_daemon):
    d: Daemon = make_daemon()
    docs_1 = ["AUTH: tokens expire after one hour.", "DB: the primary runs in Oslo.", "OAUTH: scopes are read and write."]
    q1 = {"role": "user", "content": "How long do tokens live?"}
    with httpx.Client(timeout=120) as http:
        first = http.post(
            f"{d.base_url}/chat/completions",
            json={"messages": [q1], "documents": docs_1, "conversation_id": "conv-1",
                  "max_tokens": 8, "temperature": 0},
        ).json()
        a1 = {"role": "assistant", "content": first["choices"][0]["message"]["content"]}
        q2 = {"role": "user", "content": "And where is the database?"}
        docs_2 = ["DB: the primary runs in Oslo.", "CACHE: entries live ten minutes."]
        second = http.post(
            f"{d.base_url}/chat/completions",
            headers={"X-Conversation-Id": "conv-1"},
            json={"messages": [q1, a1, q2], "documents": docs_2, "max_tokens": 4, "temperature": 0},
        ).json()
    # The whole first turn is a cached prefix of the second.
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1, (
        first["usage"], second["usage"])
    # A follow-up without documents stays in the conversation: the documents
    # of both turns are still in its prompt, which extends turn 2's.
    a2 = {"role": "assistant", "content": second["choices"][0]["message"]["content"]}
    q3 = {"role": "user", "content": "Thanks. Anything else?"}
    with httpx.Client(timeout=120) as http:
        third = http.post(
            f"{d.base_url}/chat/completions",
            json={"messages": [q1, a1, q2, a2, q3], "conversation_id": "conv-1", "max_tokens": 1},
        ).json()
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] >= second["usage"]["prompt_tokens"] - 1, (
        second["usage"], third["usage"])
    lines = d.wait_query_log(3)
    assert lines[2]["reorder"]["slot_choice"] == "conversation"
    assert lines[0]["reorder"]["slot_choice"] in ("lru", "header", "cached-prefix")
    assert lines[1]["reorder"]["slot_choice"] == "conversation"
    assert lines[1]["reorder"]["deduped"] == 1  # DB was sent in turn 1: named, not repeated
    assert lines[0]["slot_id"] == lines[1]["slot_id"]


def test_repeated_tool_output_is_sent_once(daemon):
    lines = "\n".join(f"line {i:03d}: some repeated configuration text here" for i in range(30))
    messages = [
        {"role": "user", "content": "Read the config twice."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": lines},
        {"role": "tool", "tool_call_id": "c2", "content": f"header of b\n{lines}\nfooter of b"},
    ]
    before = len(daemon.query_log_lines())
    with httpx.Client(timeout=120) as http:
        plain = http.post(f"{daemon.base_url}/chat/completions",
                          headers={"X-ContextPilot-Enabled": "false"},
                          json={"messages": messages, "max_tokens": 1}).json()
        deduped = http.post(f"{daemon.base_url}/chat/completions",
                            json={"messages": messages, "max_tokens": 1}).json()
    assert deduped["usage"]["prompt_tokens"] < plain["usage"]["prompt_tokens"], (plain["usage"], deduped["usage"])
    log = daemon.wait_query_log(before + 2)[before:]
    assert "block_dedup" not in log[0]
    assert log[1]["block_dedup"]["blocks_deduped"] == 1
    assert log[1]["block_dedup"]["chars_saved"] == 513


def test_a_batch_runs_requests_sharing_documents_together(daemon):
    volcano = [f"volcanoes note {i}: the caldera near Lima, surveyed {1900 + i}." for i in range(6)]
    river = [f"rivers note {i}: the delta near Oslo, surveyed {1950 + i}." for i in range(6)]
    requests = []
    for i in range(6):
        pool = volcano if i % 2 == 0 else river
        requests.append({
            "messages": [{"role": "user", "content": f"Question {i}?"}],
            "documents": pool[i // 2: i // 2 + 4],
            "max_tokens": 1,
            "temperature": 0,
        })
    before = len(daemon.query_log_lines())
    r = httpx.post(f"{daemon.base_url}/batch/chat/completions", json={"requests": requests}, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [a["index"] for a in body["data"]] == list(range(6))
    assert all(a["status_code"] == 200 and a["response"]["choices"] for a in body["data"]), body
    # Requests over the same documents run back to back.
    order = body["schedule"]
    assert sorted(order) == list(range(6))
    assert {i % 2 for i in order[:3]} in ({0}, {1}), order
    assert len(daemon.wait_query_log(before + 6)) == before + 6

    bad = httpx.post(f"{daemon.base_url}/batch/chat/completions", json={"requests": [{"messages": [], "stream": True}]})
    assert bad.status_code == 400 and "streaming" in bad.json()["error"]["message"]
