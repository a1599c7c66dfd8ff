"""Drives nakshatra's OpenAI-compatible API with the official `openai`
package and prints one JSON object with what it saw.

usage: openai_check.py BASE MODEL PROMPT [MAX_TOKENS [COMPLETION_PROMPT]]

COMPLETION_PROMPT (default PROMPT) is what /v1/completions continues.

BASE is the server's root (http://127.0.0.1:PORT); the client gets
BASE + "/v1". Every part is recorded even when another part fails: a part
that raises records {"exception": "..."} so the caller sees everything.
"""

import json
import sys
import traceback

import httpx
import openai


def exception(e):
    return {"exception": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}


def body_of(response):
    try:
        return response.json()
    except Exception:  # not JSON: keep the text
        return response.text


def main():
    base, model, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 24
    completion_prompt = sys.argv[5] if len(sys.argv) > 5 else prompt
    out = {"openai_version": openai.__version__}
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": prompt}]

    try:
        out["models"] = [m.model_dump() for m in client.models.list()]
    except Exception as e:
        out["models"] = exception(e)

    try:
        out["retrieved"] = client.models.retrieve(model).model_dump()
    except Exception as e:
        out["retrieved"] = exception(e)

    try:
        r = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens
        )
        out["chat"] = {
            "text": r.choices[0].message.content,
            "role": r.choices[0].message.role,
            "finish_reason": r.choices[0].finish_reason,
            "usage": r.usage.model_dump() if r.usage else None,
            "object": r.object,
            "raw": r.model_dump(),
        }
    except Exception as e:
        out["chat"] = exception(e)

    try:
        pieces, finish, usage, chunks, first_role = [], None, None, 0, None
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            chunks += 1
            if chunk.choices:
                choice = chunk.choices[0]
                if first_role is None and choice.delta.role:
                    first_role = choice.delta.role
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason
            if chunk.usage:
                usage = chunk.usage.model_dump()
        out["stream"] = {
            "text": "".join(pieces),
            "pieces": len(pieces),
            "chunks": chunks,
            "role": first_role,
            "finish_reason": finish,
            "usage": usage,
        }
    except Exception as e:
        out["stream"] = exception(e)

    try:
        r = client.completions.create(
            model=model, prompt=completion_prompt, temperature=0, max_tokens=max_tokens
        )
        out["completion"] = {
            "text": r.choices[0].text,
            "finish_reason": r.choices[0].finish_reason,
            "usage": r.usage.model_dump() if r.usage else None,
            "object": r.object,
        }
    except Exception as e:
        out["completion"] = exception(e)

    errors = {}

    def bad(name, call):
        try:
            r = call()
            errors[name] = {"status": None, "unexpected_success": str(r)[:500]}
        except openai.APIStatusError as e:
            errors[name] = {"status": e.status_code, "body": body_of(e.response)}
        except Exception as e:
            errors[name] = exception(e)

    bad(
        "unknown_model",
        lambda: client.chat.completions.create(
            model="gpt-4o", messages=messages, temperature=0, max_tokens=4
        ),
    )
    bad(
        "unknown_model_hex",
        lambda: client.chat.completions.create(
            model="f" * 64, messages=messages, temperature=0, max_tokens=4
        ),
    )
    bad(
        "negative_max_tokens",
        lambda: client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=-1
        ),
    )
    # Malformed JSON cannot go through the openai client: raw bytes with
    # httpx (an openai dependency's sibling; ollama depends on it).
    try:
        r = httpx.post(
            base + "/v1/chat/completions",
            content=b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": ',
            headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
            timeout=60,
        )
        errors["malformed_json"] = {"status": r.status_code, "body": body_of(r)}
    except Exception as e:
        errors["malformed_json"] = exception(e)
    out["errors"] = errors

    print(json.dumps(out))


if __name__ == "__main__":
    main()
