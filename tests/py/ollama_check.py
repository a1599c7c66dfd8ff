"""Drives nakshatra's Ollama-compatible API with the official `ollama`
package and prints one JSON object with what it saw.

usage: ollama_check.py BASE MODEL PROMPT [NUM_PREDICT]

Every part is recorded even when another part fails: a part that raises
records {"exception": "..."} so the caller sees everything.
"""

import json
import sys
import traceback

import httpx
import ollama


def exception(e):
    return {"exception": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}


def main():
    base, model, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    num_predict = int(sys.argv[4]) if len(sys.argv) > 4 else 24
    client = ollama.Client(host=base, timeout=120)
    options = {"temperature": 0, "num_predict": num_predict}
    messages = [{"role": "user", "content": prompt}]
    out = {}

    try:
        out["tags"] = [m.model for m in client.list().models]
    except Exception as e:
        out["tags"] = exception(e)

    try:
        s = client.show(model)
        out["show"] = {
            "details": s.details.model_dump() if s.details else None,
            "model_info": dict(s.modelinfo or {}),
            "capabilities": s.capabilities,
        }
    except Exception as e:
        out["show"] = exception(e)

    try:
        out["ps"] = [
            {"model": m.model, "context_length": m.context_length} for m in client.ps().models
        ]
    except Exception as e:
        out["ps"] = exception(e)

    try:
        r = httpx.get(base + "/api/version", timeout=30)
        out["version"] = {"status": r.status_code, "body": r.json()}
    except Exception as e:
        out["version"] = exception(e)

    try:
        pieces, last, parts = [], None, 0
        for part in client.chat(model=model, messages=messages, stream=True, options=options):
            parts += 1
            if part.message and part.message.content:
                pieces.append(part.message.content)
            last = part
        out["chat_stream"] = {
            "text": "".join(pieces),
            "parts": parts,
            "done": last.done if last else None,
            "done_reason": last.done_reason if last else None,
            "eval_count": last.eval_count if last else None,
            "prompt_eval_count": last.prompt_eval_count if last else None,
        }
    except Exception as e:
        out["chat_stream"] = exception(e)

    try:
        r = client.chat(model=model, messages=messages, stream=False, options=options)
        out["chat"] = {"text": r.message.content, "done": r.done, "done_reason": r.done_reason}
    except Exception as e:
        out["chat"] = exception(e)

    try:
        pieces = []
        for part in client.generate(model=model, prompt=prompt, stream=True, options=options):
            if part.response:
                pieces.append(part.response)
        out["generate_stream"] = {"text": "".join(pieces)}
    except Exception as e:
        out["generate_stream"] = exception(e)

    try:
        client.chat(model="llama3.2", messages=messages, stream=False, options=options)
        out["unknown_model"] = {"status": None, "unexpected_success": True}
    except ollama.ResponseError as e:
        out["unknown_model"] = {"status": e.status_code, "error": e.error}
    except Exception as e:
        out["unknown_model"] = exception(e)

    print(json.dumps(out))


if __name__ == "__main__":
    main()
