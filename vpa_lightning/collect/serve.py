"""``vpa serve MODEL``: a small OpenAI-compatible chat server over a local VLM (for ``vpa sample --backend openai``
and ``vpa judge --judge openai`` without vLLM, and for their tests).

``POST /v1/chat/completions`` (``/chat/completions`` too) takes the OpenAI body: ``messages`` (the last user turn's
text, ``image_url`` parts and, for a model that takes video, ``video_url`` parts (vLLM's; images and video files
as ``data:`` URLs only: nothing is fetched; a video's frames sampled at 2 fps, at most 16), ``n``, ``temperature``,
``top_p``, ``max_tokens``, ``seed``; it answers with ``n`` choices sampled by :func:`~vpa_lightning.collect.sample.hf_sample`
(the image encoded once for the n), and ``usage``. ``GET /v1/models`` lists the model. A malformed request gets a 400
with ``error.message``; a body over ``--max-request-mb`` a 413. One request is generated at a time (a lock); the
server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from vpa_lightning.collect.prompts import Prompt
from vpa_lightning.collect.sample import SampleSettings, hf_sample, prompt_seed

__all__ = ["make_server", "request_prompt"]


class BadRequest(ValueError):
    pass


def _image_bytes(url: Any, what: str = "image") -> bytes:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadRequest(f"{what}s must be data: URLs (this server fetches nothing)")
    head, _, data = url.partition(",")
    if ";base64" not in head:
        raise BadRequest(f"{what} data URLs must be base64")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise BadRequest(f"bad base64 {what}: {exc}") from exc


def request_prompt(messages: Any) -> Prompt:
    """The prompt of an OpenAI chat: the system text (if any) and the last user turn's text, with each image where
    its part stands."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    system = " ".join(m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "system"
                      and isinstance(m.get("content"), str))
    user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
    if user is None:
        raise BadRequest("no user message")
    content = user.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise BadRequest("user content must be a string or a list of parts")
    question, images, offsets = (system + "\n") if system else "", [], []
    videos: list[bytes] = []
    video_offsets: list[int] = []
    for part in parts:
        if not isinstance(part, dict):
            raise BadRequest("a content part is not an object")
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            question += part["text"]
        elif part.get("type") == "image_url":
            images.append(_image_bytes((part.get("image_url") or {}).get("url")))
            offsets.append(len(question))
        elif part.get("type") == "video_url":  # vLLM's video part: a video file as a data URL
            videos.append(_image_bytes((part.get("video_url") or {}).get("url"), "video"))
            video_offsets.append(len(question))
        else:
            raise BadRequest(f"unsupported content part {str(part.get('type'))[:40]!r}")
    if not question.strip():
        raise BadRequest("no text in the user message")
    first = all(o == 0 for o in [*offsets, *video_offsets])
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
    return Prompt(id=digest, question=question.strip() if first else question, images=images,
                  offsets=None if first else offsets, videos=list(videos),
                  video_offsets=None if first or not videos else video_offsets)


def make_server(model: Any, processor: Any, name: str, host: str = "127.0.0.1", port: int = 0,
                max_request_bytes: int = 64 << 20) -> ThreadingHTTPServer:
    """A server (not yet serving: call ``serve_forever``) answering with ``model``; ``port=0`` picks a free port."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: a judge sends thousands
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "vpa"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > max_request_bytes:
                self._send(413, {"error": {"message": f"request of {length} bytes is over the limit"}})
                self.close_connection = True
                return
            try:
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise BadRequest("the body is not a JSON object")
                prompt = request_prompt(body.get("messages"))
                n = int(body.get("n", 1))
                settings = SampleSettings(k=n, temperature=float(body.get("temperature", 1.0)),
                                          top_p=float(body.get("top_p", 1.0)), max_new_tokens=int(body.get("max_tokens", 128)))
                settings.check("request")
                if n > 64:
                    raise BadRequest(f"n={n} is over 64")
                seed = body.get("seed")
                seed = int(seed) if seed is not None else prompt_seed(0, name, prompt.id + str(time.time_ns()))
            except (ValueError, TypeError) as exc:
                self._send(400, {"error": {"message": str(exc)[:500], "type": "invalid_request_error"}})
                return
            try:
                with lock:
                    answers = hf_sample(model, processor, prompt, settings, seed)
            except ValueError as exc:  # an image or video that does not decode, a video to a model without video
                self._send(400, {"error": {"message": str(exc)[:500], "type": "invalid_request_error"}})
                return
            prompt_tokens = 0
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                            for i, (text, _) in enumerate(answers)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(k for _, k in answers),
                          "total_tokens": prompt_tokens + sum(k for _, k in answers)},
            })

    return ThreadingHTTPServer((host, port), Handler)
