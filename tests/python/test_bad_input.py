"""Requests the gateway must refuse, in OpenAI's error shape, without falling
over: it still serves a normal request afterwards."""

from __future__ import annotations

import json

import httpx

from e2e import MODEL_ALIAS, assert_openai_error

KEY = "s3cret"


def test_bad_requests_are_refused_and_the_daemon_keeps_serving(make_daemon):
    d = make_daemon(server={"api_key": KEY, "max_body_bytes": 4096})
    auth = {"Authorization": f"Bearer {KEY}"}
    chat_url = f"{d.base_url}/chat/completions"

    with httpx.Client(timeout=30) as http:
        # Malformed JSON: 400 (llama-server itself would say 500).
        r = http.post(
            chat_url,
            content=b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}',
            headers={**auth, "Content-Type": "application/json"},
        )
        assert_openai_error(r, 400)

        # A well-formed request over max_body_bytes: 413.
        big = json.dumps(
            {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "lighthouse " * 1500}], "max_tokens": 8}
        ).encode()
        assert len(big) > 4096 * 3
        r = http.post(chat_url, content=big, headers={**auth, "Content-Type": "application/json"})
        assert_openai_error(r, 413)

        assert_openai_error(http.get(f"{d.base_url}/nope", headers=auth), 404)
        assert_openai_error(http.get(chat_url, headers=auth), 405)

        # The API key: none or a wrong one is 401; /health never needs one.
        assert_openai_error(http.get(f"{d.base_url}/models"), 401)
        assert_openai_error(http.get(f"{d.base_url}/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_openai_error(
            http.post(
                chat_url,
                json={"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
                headers={"Authorization": "Bearer wrong"},
            ),
            401,
        )
        r = http.get(f"{d.root}/health")
        assert r.status_code == 200, f"/health without a key: HTTP {r.status_code} {r.text}"
        r = http.get(f"{d.base_url}/models", headers=auth)
        assert r.status_code == 200, f"/v1/models with the key: HTTP {r.status_code} {r.text}"

    # After all of that, a normal request through the SDK.
    client = d.client(api_key=KEY, max_retries=0)
    r = client.chat.completions.create(
        model=MODEL_ALIAS, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert r.choices[0].message.content, r
