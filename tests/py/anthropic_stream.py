"""Streams a message with the official Anthropic Python SDK through Lever.

Usage: anthropic_stream.py BASE_URL TOKEN [PROMPT]
Prints one JSON object: the streamed text, the final message's usage, the
response headers, the raw bytes of a non-streaming call, and the error (if
any) of a call made with a bad token.
"""
import json
import sys

import anthropic


def main() -> None:
    base_url, token = sys.argv[1], sys.argv[2]
    prompt = sys.argv[3] if len(sys.argv) > 3 else "hello mock:events=4 gap_ms=20"
    client = anthropic.Anthropic(base_url=base_url, api_key=token, max_retries=0, timeout=30)
    out = {}
    with client.messages.stream(
        model="claude-mock-1",
        max_tokens=64,
        messages=[{"role": "user", "content": prompt}],
    ) as stream:
        out["text"] = "".join(stream.text_stream)
        final = stream.get_final_message()
        out["usage"] = {"input": final.usage.input_tokens, "output": final.usage.output_tokens}
        out["headers"] = dict(stream.response.headers)
    raw = client.messages.with_raw_response.create(
        model="claude-mock-1", max_tokens=8, messages=[{"role": "user", "content": "plain"}]
    )
    out["raw"] = raw.http_response.text
    out["raw_headers"] = dict(raw.headers)
    bad = anthropic.Anthropic(base_url=base_url, api_key="not-a-token", max_retries=0, timeout=30)
    try:
        bad.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}])
        out["bad"] = None
    except anthropic.APIStatusError as e:
        out["bad"] = {"status": e.status_code, "type": e.body.get("error", {}).get("type") if isinstance(e.body, dict) else None}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
