"""llama-server killed with SIGKILL in the middle of a request: a
non-streaming request is retried on the restarted child; a stream that already
sent tokens ends with an error the SDK raises. Each test has its own daemon."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from e2e import MODEL_ALIAS, wait_until

# ~300 tokens at ~45 tokens/s on two cores: several seconds of generation in
# which to kill the child.
LONG = dict(
    model=MODEL_ALIAS,
    messages=[{"role": "user", "content": "Tell a long story about a lighthouse keeper and his cat."}],
    max_tokens=300,
    temperature=0,
    extra_body={"ignore_eos": True},
)


def busy_slot(daemon):
    """True once the daemon's proxied /slots shows a slot processing."""
    r = daemon.get("/slots")
    if r.status_code != 200:
        return False
    slots = r.json()
    assert isinstance(slots, list), f"/slots is not a list: {slots!r}"
    return any(s.get("is_processing") for s in slots)


def wait_restarted(daemon, old_pid: int) -> dict:
    def restarted():
        status = daemon.status()
        child = status["child"]
        return status if child["restarts"] >= 1 and child["pid"] not in (None, old_pid) else None

    return wait_until(60, f"a new llama-server after killing pid {old_pid}", restarted, interval_s=0.1)


def test_sigkill_during_request_is_retried(make_daemon):
    d = make_daemon()
    client = d.client(max_retries=0, timeout=240)
    before = len(d.query_log_lines())
    pid = d.child_pid()

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(client.chat.completions.create, **LONG)

        def processing():
            if future.done():
                pytest.fail(f"the request finished before a slot was seen processing: {future.result()!r}")
            return busy_slot(d)

        wait_until(30, "a slot with is_processing on GET /slots", processing)
        os.kill(pid, signal.SIGKILL)
        # Raises here if the SDK call failed (the daemon did not retry).
        completion = future.result(timeout=300)

    content = completion.choices[0].message.content
    assert isinstance(content, str) and content, f"not a normal completion: {completion!r}"
    assert completion.usage is not None and completion.usage.completion_tokens > 0, completion.usage

    lines = d.wait_query_log(before + 1)
    new = lines[before:]
    assert len(new) == 1, f"expected one query_log line for the request, got {new!r}"
    assert new[0].get("retried") is True, f"query_log line should have retried == true: {new[0]!r}"
    assert new[0].get("status_code") == 200, new[0]
    status = wait_restarted(d, pid)
    assert status["child"]["restarts"] >= 1


def test_sigkill_during_stream_ends_with_error(make_daemon):
    d = make_daemon()
    client = d.client(max_retries=0, timeout=60)
    before = len(d.query_log_lines())
    pid = d.child_pid()

    stream = client.chat.completions.create(**LONG, stream=True)
    chunks = iter(stream)
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    else:
        pytest.fail("the stream ended before its first content delta")

    os.kill(pid, signal.SIGKILL)
    received = 0
    # An SSE event carrying an `error` object raises APIError; a cut
    # connection raises APIConnectionError (a subclass).
    with pytest.raises(openai.APIError) as excinfo:
        for _ in chunks:
            received += 1
    error = excinfo.value
    assert not isinstance(error, openai.APITimeoutError), (
        f"the stream hung until the client's timeout after the kill ({received} more chunks)"
    )

    lines = d.wait_query_log(before + 1)
    new = lines[before:]
    errored = [l for l in new if l.get("error")]
    assert errored, f"no query_log line with a non-empty `error` for the cut stream: {new!r}"
    assert errored[-1].get("stream") is True, errored[-1]
    d.query_log_lines()  # every line still parses

    wait_restarted(d, pid)
    wait_until(60, "/health 200 after the restart", lambda: d.get("/health").status_code == 200, interval_s=0.1)


def test_a_stream_cut_by_sigterm_is_recorded_before_the_daemon_exits(make_daemon):
    """SIGTERM in the middle of a stream: the daemon exits 0, and its query
    log, read only after the exit (nothing waits for a late write), holds the
    stream's record: shutdown waits for every stream task before the meter
    flushes."""
    d = make_daemon()
    client = d.client(max_retries=0, timeout=60)
    before = len(d.query_log_lines())
    stream = client.chat.completions.create(**LONG, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    else:
        pytest.fail("the stream ended before its first content delta")
    assert d.stop() == 0
    stream.close()
    new = d.query_log_lines()[before:]
    assert len(new) == 1, new
    assert new[0].get("stream") is True, new[0]
