"""Calls a Switchyard frontend's HTTP API with the official `openai` package.

Usage: openai_client.py BASE_URL KEY LIMITED_KEY MODEL
Prints one JSON object with what each call returned (tests/tests/openai.rs checks it).
"""

import json
import sys

import openai

base, key, limited_key, model = sys.argv[1:5]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]
greedy = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
out = {}

out["models"] = [m.id for m in client.models.list()]

r = client.chat.completions.create(model=model, messages=messages, **greedy)
out["chat"] = {
    "content": r.choices[0].message.content,
    "role": r.choices[0].message.role,
    "finish": r.choices[0].finish_reason,
    "object": r.object,
    "usage": r.usage.model_dump(),
}

parts, usage, finish, chunks = [], None, None, 0
stream = client.chat.completions.create(
    model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **greedy
)
for event in stream:
    chunks += 1
    if event.choices:
        parts.append(event.choices[0].delta.content or "")
        finish = event.choices[0].finish_reason or finish
    if event.usage:
        usage = event.usage.model_dump()
out["stream"] = {"content": "".join(parts), "finish": finish, "usage": usage, "chunks": chunks}

c = client.completions.create(model=model, prompt="The capital of France is", **greedy)
out["completion"] = {"text": c.choices[0].text, "finish": c.choices[0].finish_reason}

# The client goes away mid-stream: the request is cancelled.
stream = client.chat.completions.create(
    model=model, messages=messages, stream=True, max_tokens=200, extra_body={"ignore_eos": True}
)
for i, _ in enumerate(stream):
    if i == 2:
        break
stream.close()


def error(e):
    return {"status": e.status_code, "body": e.body, "headers": dict(e.response.headers)}


try:
    openai.OpenAI(base_url=base + "/v1", api_key="not-a-key-0123456789", max_retries=0).models.list()
    out["unauthenticated"] = None
except openai.AuthenticationError as e:
    out["unauthenticated"] = error(e)

try:
    client.chat.completions.create(model=model, messages=messages, n=2)
    out["unsupported"] = None
except openai.BadRequestError as e:
    out["unsupported"] = error(e)

try:
    client.chat.completions.create(model="gpt-4o", messages=messages)
    out["unknown_model"] = None
except openai.NotFoundError as e:
    out["unknown_model"] = error(e)

limited = openai.OpenAI(base_url=base + "/v1", api_key=limited_key, max_retries=0)
out["limited"] = None
out["limited_ok"] = 0
for _ in range(5):
    try:
        limited.chat.completions.create(model=model, messages=messages, max_tokens=2)
        out["limited_ok"] += 1
    except openai.RateLimitError as e:
        out["limited"] = error(e)
        break

print(json.dumps(out))
