"""Real SDK clients against a running Tollgate (which forwards to the mock provider).

Usage: python clients.py BASE_URL GATEWAY_KEY
Prints one JSON object with what each client saw; the Rust test asserts on it.
"""
import json
import sys

import anthropic
import openai

base, key = sys.argv[1], sys.argv[2]
out = {}

oa = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=20)
an = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=20)
messages = [{"role": "user", "content": "Say hello"}]

raw = oa.chat.completions.with_raw_response.create(
    model="gpt-4o", messages=messages, extra_headers={"x-tollgate-customer": "sdk-cust"})
chat = raw.parse()
out["openai_json"] = {
    "cost": raw.headers.get("x-tollgate-cost"),
    "tokens_in": raw.headers.get("x-tollgate-tokens-in"),
    "tokens_out": raw.headers.get("x-tollgate-tokens-out"),
    "customer": raw.headers.get("x-tollgate-customer"),
    "prompt_tokens": chat.usage.prompt_tokens,
    "content": chat.choices[0].message.content,
}

text = "".join(
    c.choices[0].delta.content or ""
    for c in oa.chat.completions.create(model="gpt-4o", messages=messages, stream=True)
    if c.choices
)
with oa.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=messages, stream=True) as resp:
    lines = list(resp.iter_lines())
out["openai_stream"] = {
    "text": text,
    "request_id": resp.headers.get("x-tollgate-request-id"),
    "cost_comment": [l for l in lines if l.startswith(": tollgate")],
}

raw = an.messages.with_raw_response.create(
    model="claude-sonnet-4-5", max_tokens=64, messages=messages)
msg = raw.parse()
out["anthropic_json"] = {
    "cost": raw.headers.get("x-tollgate-cost"),
    "tokens_in": raw.headers.get("x-tollgate-tokens-in"),
    "tokens_out": raw.headers.get("x-tollgate-tokens-out"),
    "output_tokens": msg.usage.output_tokens,
}

with an.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=messages) as s:
    stream_text = "".join(s.text_stream)
    final = s.get_final_message()
out["anthropic_stream"] = {"text": stream_text, "output_tokens": final.usage.output_tokens}

errors = {}
try:
    openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).chat.completions.create(
        model="gpt-4o", messages=messages)
except openai.AuthenticationError as e:
    errors["openai_401"] = e.status_code
try:
    anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
        model="claude-sonnet-4-5", max_tokens=5, messages=messages)
except anthropic.AuthenticationError as e:
    errors["anthropic_401"] = e.status_code
try:
    oa.chat.completions.create(model="no-such-model", messages=messages)
except openai.NotFoundError as e:
    errors["openai_404"] = e.status_code
broke = {"x-tollgate-customer": "broke"}
try:
    oa.chat.completions.create(model="gpt-4o", messages=messages, extra_headers=broke)
except openai.RateLimitError as e:
    errors["openai_budget_429"] = e.status_code
    errors["openai_budget_type"] = e.body.get("type") if isinstance(e.body, dict) else None
try:
    an.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=messages, extra_headers=broke)
except anthropic.RateLimitError as e:
    errors["anthropic_budget_429"] = e.status_code
out["errors"] = errors

print(json.dumps(out))
