"""contextpilotd's `POST /reorder` driven by the HTTP client of the PyPI
package `contextpilot` (pinned in requirements-nodeps.txt), unchanged: an
existing ContextPilot user points it at contextpilotd and gets the same
answers for the batch cases of the reference behaviour."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from e2e import wait_until


def load_client_class():
    """The package's own `server/http_client.py`, loaded without running the
    package's heavy `server/__init__.py` (it needs only `requests`)."""
    package = importlib.util.find_spec("contextpilot")
    assert package is not None and package.submodule_search_locations, "contextpilot is not installed"
    path = Path(list(package.submodule_search_locations)[0]) / "server" / "http_client.py"
    spec = importlib.util.spec_from_file_location("contextpilot_http_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ContextPilotIndexClient


def test_the_reference_client_reorders_through_contextpilotd(daemon):
    client = load_client_class()(daemon.root, timeout=30)
    # The default index is live, like the reference server's: each batch
    # below starts from an empty index, so its answer is the batch answer.
    client.reset()

    # Strings: the shared blocks come first in first-appearance order, and
    # contexts sharing them are scheduled together.
    reordered, order = client.reorder(
        [["G", "A", "F", "B", "E", "C"], ["X", "Y", "Z", "W", "V", "U"], ["C", "D", "A", "H", "B", "I"]]
    )
    assert order == [0, 2, 1]
    assert reordered == [["A", "B", "C", "G", "F", "E"], ["A", "B", "C", "D", "H", "I"], ["X", "Y", "Z", "W", "V", "U"]]
    client.reset()

    # Integers, and the first-appearance prefix order.
    reordered, order = client.reorder([[5, 1, 9, 2], [2, 7, 1, 5], [8, 3, 4]])
    assert [reordered[order.index(i)] for i in range(3)] == [[1, 2, 5, 9], [1, 2, 5, 7], [8, 3, 4]]
    client.reset()
    reordered, _ = client.reorder([["C", "A", "D", "B"], ["B", "E", "A", "C"]])
    assert reordered == [["C", "A", "B", "D"], ["C", "A", "B", "E"]]

    client.reset()
    raw = client.reorder_raw([[1, 2, 3, 100, 101], [1, 2, 3, 102, 103], [10, 20, 30, 200, 201]])
    assert raw["mode"] == "initial"
    assert raw["num_contexts"] == 3
    assert [g[1] for g in raw["groups"]] == [[0, 1], [2]]


def test_the_live_index_through_the_reference_client(daemon):
    """The stateful API: incremental placement, request ids, search,
    eviction with pruning and id normalisation, reset."""
    client = load_client_class()(daemon.root, timeout=30)
    assert client.reset()["conversation_tracker"] == "reset"

    first = client.reorder_raw([[1, 2, 3], [1, 2, 4], [5, 6, 7]])
    assert first["mode"] == "initial"
    ids = first["request_ids"]
    assert len(set(ids)) == 3 and all(i.startswith("req-") for i in ids)
    assert sorted(client.get_requests()["request_ids"]) == sorted(ids)
    assert client.get_stats()["index_stats"]["num_nodes"] == 5

    # Later contexts are placed against the index: the shared blocks first,
    # and the pairing with original_indices holds on every call.
    contexts = [[9, 4, 2, 1], [70, 71]]
    reordered, order = client.reorder(contexts)
    assert sorted(order) == [0, 1]
    assert reordered[order.index(0)] == [1, 2, 4, 9]
    assert reordered[order.index(1)] == [70, 71]
    raw = client.reorder_raw([[5, 6, 8]])
    assert raw["mode"] == "incremental" and raw["matched_count"] == 1

    hit = client.search([1, 2, 3])
    assert hit["node_id"] >= 0 and hit["prefix_length"] == 3 and hit["has_prefix"] is True
    assert client.search([404])["node_id"] == -1

    evicted = client.evict([f"chatcmpl-{ids[0]}", "slot_3", "HEALTH_CHECK_1"])
    assert evicted["normalized_request_ids"] == [ids[0], "slot_3"]
    assert evicted["removed_count"] == 1 and evicted["not_found"] == ["slot_3"]
    assert ids[0] not in client.get_requests()["request_ids"]

    assert client.reset()["message"] == "Index reset to initial state"
    response = client.session.get(f"{daemon.root}/requests", timeout=10)
    assert response.status_code == 503


def test_multi_turn_dedup_through_the_reference_client(daemon):
    client = load_client_class()(daemon.root, timeout=30)
    client.reset()
    turn1 = client.reorder_raw([["auth", "db", "oauth"]], deduplicate=True)
    rid = turn1["request_ids"][0]
    turn2 = client.reorder_raw([["auth", "cache"]], deduplicate=True, parent_request_ids=[rid])
    result = turn2["deduplication"]["results"][0]
    assert result["overlapping_docs"] == ["auth"] and result["new_docs"] == ["cache"]
    assert result["reference_hints"] == ["Please refer to [Doc auth] from the previous conversation turn."]
    # The lightweight endpoint the client documents (its own server lost it).
    turn3 = client.deduplicate([["db", "deploy"]], parent_request_ids=[turn2["request_ids"][0]])
    assert turn3["results"][0]["overlapping_docs"] == ["db"]
    assert turn3["results"][0]["doc_source_turns"] == {"db": 1}


def test_a_slot_answering_a_new_request_evicts_the_one_it_held(daemon):
    """Requests tagged with their index request id (`rid`, as the reference's
    clients send it) run on slots the daemon chooses; when a slot answers
    another request, the id it held leaves the live index."""
    client = load_client_class()(daemon.root, timeout=30)
    client.reset()
    ids = client.reorder_raw([[1, 2, 3], [7, 8, 9]])["request_ids"]

    def complete(rid: str | None, prompt: str) -> int:
        logged = len(daemon.query_log_lines())
        body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
        if rid:
            body["rid"] = rid
        response = client.session.post(f"{daemon.root}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return daemon.wait_query_log(logged + 1)[-1]["slot_id"]

    # Long enough for prefix-based slot choice to count it.
    prompt = " ".join(f"Document {n} says hello to document {n + 1}." for n in range(60))
    slot = complete(ids[0], prompt)
    assert ids[0] in client.get_requests()["request_ids"]
    # The same prompt again lands on the same slot (longest common prefix)
    # with no id: the slot's earlier request is gone from its cache.
    again = complete(None, prompt)
    assert again == slot

    def evicted():
        remaining = client.get_requests()["request_ids"]
        return remaining if ids[0] not in remaining else None

    remaining = wait_until(10, "the overwritten slot's request id to leave the index", evicted)
    assert ids[1] in remaining, remaining
