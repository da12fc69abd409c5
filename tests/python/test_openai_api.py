"""The OpenAI-compatible API through the official SDK, and what the meter
writes for it. All tests here share one daemon (module scope), in file order."""

from __future__ import annotations

import re
import uuid

import httpx
import openai
import pytest

from e2e import MODEL_ALIAS, assert_openai_error, is_int, is_number, long_system_prompt


@pytest.fixture(scope="module")
def client(daemon):
    return daemon.client(max_retries=0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assert_cached_tokens_int(usage, what: str) -> None:
    assert usage is not None, f"{what}: no usage"
    details = usage.prompt_tokens_details
    assert details is not None, f"{what}: usage has no prompt_tokens_details: {usage!r}"
    assert is_int(details.cached_tokens), f"{what}: prompt_tokens_details.cached_tokens is not an int: {details!r}"


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=MODEL_ALIAS, messages=user("Say hello to the museum visitors."), max_tokens=8, temperature=0
    )
    content = r.choices[0].message.content
    assert isinstance(content, str) and content, f"empty content: {r!r}"
    assert r.usage is not None and r.usage.prompt_tokens > 0, f"usage: {r.usage!r}"
    assert_cached_tokens_int(r.usage, "chat completion")


def test_chat_completion_stream_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=user("Name three colours."),
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks, "the stream had no chunks"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text, f"no content deltas in {len(chunks)} chunks"
    last = chunks[-1]
    assert last.choices == [], f"the last chunk should have choices == [] (the usage chunk): {last!r}"
    assert last.usage is not None and last.usage.prompt_tokens > 0, f"the last chunk has no usage: {last!r}"
    assert_cached_tokens_int(last.usage, "stream usage chunk")


def test_completion(client):
    r = client.completions.create(model=MODEL_ALIAS, prompt="The harbour museum opens at", max_tokens=8)
    text = r.choices[0].text
    assert isinstance(text, str) and text, f"empty text: {r!r}"
    assert r.usage is not None and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, f"usage: {r.usage!r}"


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ALIAS], f"models: {models!r}"


def test_messages_not_a_list_is_400(daemon, client):
    # Raw: the whole body is OpenAI's error shape with code 400.
    r = httpx.post(
        f"{daemon.base_url}/chat/completions",
        json={"model": MODEL_ALIAS, "messages": "not a list", "max_tokens": 8},
        timeout=30,
    )
    assert_openai_error(r, 400)
    # The SDK turns it into BadRequestError (extra_body overrides `messages`).
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=MODEL_ALIAS, messages=user("hi"), max_tokens=8, extra_body={"messages": "not a list"}
        )
    assert excinfo.value.status_code == 400
    assert isinstance(excinfo.value.body, dict) and excinfo.value.body.get("code") == 400, excinfo.value.body


def test_prefix_reuse(daemon, client):
    system = long_system_prompt()
    before = len(daemon.query_log_lines())

    def ask(question: str):
        return client.chat.completions.create(
            model=MODEL_ALIAS,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=8,
            temperature=0,
        )

    ask("Where is the red ledger?")
    second = ask("Which shelf holds the blue kettle?")
    assert_cached_tokens_int(second.usage, "second request")
    assert second.usage.prompt_tokens_details.cached_tokens > 0, (
        f"the second request shares a ~350-token system prompt but reused nothing: {second.usage!r}"
    )

    lines = daemon.wait_query_log(before + 2)
    line = lines[before + 1]
    assert line.get("prompt_tokens") == second.usage.prompt_tokens, (
        f"query_log line {before + 2} does not look like the second request ({second.usage!r}): {line!r}"
    )
    reuse = line.get("cache_reuse")
    assert isinstance(reuse, dict), f"no cache_reuse in {line!r}"
    assert reuse.get("reused_tokens", 0) > 0, f"cache_reuse.reused_tokens: {reuse!r}"
    assert reuse.get("reuse_ratio_pct", 0) > 0, f"cache_reuse.reuse_ratio_pct: {reuse!r}"


TOP_LEVEL_FIELDS = [
    "query_id", "timestamp", "path", "model", "slot_id", "status_code", "stream",
    "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens", "cache_reuse", "retried",
]  # fmt: skip
CACHE_REUSE_FIELDS = [
    "total_prompt_tokens", "reused_tokens", "newly_computed", "reuse_ratio_pct",
    "prompt_eval_ms", "gen_ms", "prompt_tps", "gen_tps",
]  # fmt: skip
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def test_query_log_fields_and_no_prompt_text(daemon, client):
    marker = f"quokka{uuid.uuid4().hex[:12]}"
    before = len(daemon.query_log_lines())
    client.chat.completions.create(
        model=MODEL_ALIAS, messages=user(f"Ignore the tag {marker}. What is two plus two?"), max_tokens=8, temperature=0
    )
    list(
        client.chat.completions.create(
            model=MODEL_ALIAS,
            messages=[{"role": "system", "content": f"Internal tag: {marker}."}, *user("Count to three.")],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    client.completions.create(model=MODEL_ALIAS, prompt=f"[{marker}] The lighthouse keeper said", max_tokens=8)

    lines = daemon.wait_query_log(before + 3)
    ours = lines[before : before + 3]
    assert [(l.get("path"), l.get("stream")) for l in ours] == [
        ("/v1/chat/completions", False),
        ("/v1/chat/completions", True),
        ("/v1/completions", False),
    ], f"the last three query_log lines are not this test's requests: {ours!r}"

    for n, line in enumerate(lines, 1):
        where = f"query_log line {n}: {line!r}"
        missing = [k for k in TOP_LEVEL_FIELDS if k not in line]
        assert not missing, f"missing {missing} in {where}"
        assert isinstance(line["query_id"], (str, int)) and str(line["query_id"]), where
        assert isinstance(line["timestamp"], str) and RFC3339_UTC.match(line["timestamp"]), (
            f"timestamp is not RFC 3339 UTC ending in Z: {where}"
        )
        assert isinstance(line["path"], str) and line["path"].startswith("/"), where
        assert is_int(line["status_code"]), where
        assert isinstance(line["stream"], bool) and isinstance(line["retried"], bool), where
        if line["status_code"] != 200 or line.get("error"):
            continue  # a rejected request may have no slot, timings or usage
        assert line["model"] == MODEL_ALIAS, where
        assert is_int(line["slot_id"]) and line["slot_id"] >= 0, where
        for key in ("latency_ms", "ttft_ms"):
            assert is_number(line[key]) and line[key] >= 0, f"{key}: {where}"
        assert is_int(line["prompt_tokens"]) and line["prompt_tokens"] > 0, where
        assert is_int(line["completion_tokens"]) and line["completion_tokens"] >= 0, where
        reuse = line["cache_reuse"]
        assert isinstance(reuse, dict), f"cache_reuse: {where}"
        missing = [k for k in CACHE_REUSE_FIELDS if k not in reuse]
        assert not missing, f"missing cache_reuse.{missing} in {where}"
        for key in CACHE_REUSE_FIELDS:
            assert is_number(reuse[key]) and reuse[key] >= 0, f"cache_reuse.{key}: {where}"
        assert reuse["reused_tokens"] + reuse["newly_computed"] == reuse["total_prompt_tokens"], (
            f"reused_tokens + newly_computed != total_prompt_tokens: {where}"
        )
        assert reuse["reuse_ratio_pct"] <= 100, where

    query_ids = [str(l["query_id"]) for l in lines]
    assert len(set(query_ids)) == len(query_ids), f"query_id repeats: {query_ids}"
    assert marker not in daemon.query_log.read_text(), f"prompt text ({marker}) leaked into {daemon.query_log}"


def test_a_stream_closed_right_after_done_counts_as_answered(daemon):
    """A client that hangs up as soon as it has read `data: [DONE]` got the
    whole answer: the request is recorded as a 200 and its conversation turn
    is kept, so the next turn continues it."""
    conversation = f"closed-early-{uuid.uuid4().hex[:8]}"
    docs = ["RIVER: the delta lies near Oslo.", "BRIDGE: the arch spans 40 metres."]
    q1 = {"role": "user", "content": "Where is the delta?"}
    before = len(daemon.query_log_lines())
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{daemon.base_url}/chat/completions",
                         json={"messages": [q1], "documents": docs, "conversation_id": conversation,
                               "stream": True, "max_tokens": 4, "temperature": 0}) as r:
            assert r.status_code == 200
            text = ""
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]" and "choices" in line:
                    for choice in __import__("json").loads(line[6:]).get("choices", []):
                        text += (choice.get("delta") or {}).get("content") or ""
                if line == "data: [DONE]":
                    break  # leave without reading the end of the body
        record = daemon.wait_query_log(before + 1)[before]
        assert record["status_code"] == 200, record
        second = http.post(f"{daemon.base_url}/chat/completions",
                           json={"messages": [q1, {"role": "assistant", "content": text or "ok"},
                                              {"role": "user", "content": "And the bridge?"}],
                                 "documents": docs, "conversation_id": conversation, "max_tokens": 1})
        assert second.status_code == 200, second.text
    record = daemon.wait_query_log(before + 2)[before + 1]
    assert record["reorder"]["slot_choice"] == "conversation", record["reorder"]
