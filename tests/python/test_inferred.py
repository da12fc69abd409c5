"""Inferred mode, driven with the official OpenAI SDK: requests without
`documents` whose tool results hold document lists. Known documents are put
first, documents already in the prompt are not sent again, and a later turn
forwards the earlier ones byte-identical, which the child's own cache counter
(`cached_tokens` = `timings.cache_n`) shows. Inferred mode runs with
`quality = "balanced"` (or `infer_documents = true`); the default, strict,
leaves such requests as the client wrote them."""

from __future__ import annotations

import json

import httpx

from e2e import MODEL_ALIAS, Daemon

# The module's shared daemon runs inferred mode.
DAEMON_REORDER = {"quality": "balanced"}


def doc(name: str) -> str:
    # Long enough that a document is worth many tokens.
    return f"{name}: " + " ".join(f"{name.lower()} fact {i} is recorded in the handbook." for i in range(8))


def xml(names: list[str]) -> str:
    items = "\n".join(f"<document>{doc(n)}</document>" for n in names)
    return f"Search results:\n<documents>\n{items}\n</documents>"


def tool_turn(call_id: str, names: list[str]) -> list[dict]:
    return [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": call_id, "content": xml(names)},
    ]


def ask(client, messages: list[dict], **headers: str):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ALIAS, messages=messages, max_tokens=4, temperature=0,
        extra_headers=headers or None,
    )
    result = raw.headers.get("x-contextpilot-result")
    return raw.parse(), (json.loads(result) if result else None)


def test_by_default_tool_results_are_forwarded_as_the_client_wrote_them(make_daemon):
    """strict (the default) runs no inferred mode: the same requests that
    balanced reorders get no report and no reorder record."""
    d: Daemon = make_daemon()
    client = d.client()
    base = [{"role": "user", "content": "Summarise."}]
    _, report = ask(client, base + tool_turn("s0", ["SIGMA", "TAU"]))
    assert report is None
    _, report = ask(client, base + tool_turn("s1", ["TAU", "SIGMA"]))
    assert report is None
    lines = d.wait_query_log(2)
    assert all(line.get("reorder") is None for line in lines), lines


def test_tool_results_are_reordered_deduplicated_and_stay_a_cached_prefix(make_daemon):
    d: Daemon = make_daemon(reorder=DAEMON_REORDER)
    client = d.client()
    system = {"role": "system", "content": "You are a research agent. Answer briefly."}

    # Another session sees alpha, beta, gamma first: that order is canonical.
    _, report = ask(client, [system, {"role": "user", "content": "What about gamma?"}, *tool_turn("p1", ["ALPHA", "BETA", "GAMMA"])])
    assert report is not None and report["reorder_details"] == [], report

    q1 = {"role": "user", "content": "What do we know about delta?"}
    turn1 = [system, q1, *tool_turn("c1", ["DELTA", "BETA", "ALPHA"])]
    first, report = ask(client, turn1)
    assert report["reorder_details"] == [{
        "source": "tool_result[3]", "count": 3, "original_order": [0, 1, 2], "reordered_order": [2, 1, 0]}], report
    assert report["documents_reordered"] is True

    # Turn 2 repeats the history as the client has it (original order) and
    # adds a result holding one document already in the prompt.
    a1 = {"role": "assistant", "content": first.choices[0].message.content or "ok"}
    q2 = {"role": "user", "content": "And epsilon?"}
    turn2 = turn1 + [a1, q2, *tool_turn("c2", ["EPSILON", "ALPHA", "ZETA"])]
    second, report = ask(client, turn2)
    assert report["replayed_messages"] == 4, report
    assert report["documents_deduplicated"] == 1, report
    # The whole first turn is a cached prefix of the second: its rewritten
    # tool result was forwarded again byte-identical.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1, (
        first.usage, second.usage)

    lines = d.wait_query_log(3)
    assert lines[1]["reorder"]["slot_choice"] == "inferred"
    assert lines[1]["reorder"]["moved"] == 2
    assert lines[2]["reorder"]["deduped"] == 1
    assert lines[1]["slot_id"] == lines[2]["slot_id"]


def test_headers_control_inferred_mode(daemon):
    client = daemon.client()
    base = [{"role": "user", "content": "Summarise."}]
    _, report = ask(client, base + tool_turn("k0", ["KAPPA", "LAMBDA"]))
    # Disabled: nothing is touched and nothing is reported.
    plain, report = ask(client, base + tool_turn("k1", ["LAMBDA", "KAPPA"]), **{"X-ContextPilot-Enabled": "false"})
    assert report is None
    reordered, report = ask(client, base + tool_turn("k1", ["LAMBDA", "KAPPA"]))
    assert report["reorder_details"][0]["reordered_order"] == [1, 0], report
    # Only tool results with the system scope: nothing is found.
    _, report = ask(client, base + tool_turn("k2", ["MU", "NU"]), **{"X-ContextPilot-Scope": "system"})
    assert report is None
    # Numbered lists are found too.
    numbered = base + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "n1", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "n1", "content": f"[1] {doc('LAMBDA')}\n[2] {doc('KAPPA')}"},
    ]
    _, report = ask(client, numbered, **{"X-ContextPilot-Mode": "numbered"})
    assert report["total_documents"] == 2 and report["reorder_details"][0]["reordered_order"] == [1, 0], report


def test_metadata_goes_into_a_header_never_into_the_body(daemon):
    """Reference case 31: what the daemon did is reported in a response
    header; bodies carry no `_contextpilot` key."""
    messages = [{"role": "user", "content": "Summarise."}, *tool_turn("m1", ["OMICRON", "PI"])]
    with httpx.Client(timeout=120) as http:
        first = http.post(f"{daemon.base_url}/chat/completions",
                          json={"messages": messages, "max_tokens": 1})
        second = http.post(f"{daemon.base_url}/chat/completions",
                           json={"messages": [messages[0], *tool_turn("m1", ["PI", "OMICRON"])], "max_tokens": 1})
    for r in (first, second):
        assert r.status_code == 200, r.text
        assert "_contextpilot" not in r.text
    assert json.loads(second.headers["x-contextpilot-result"])["intercepted"] is True
