"""Fixtures of the collection tests: a small demo world of prompts (images, questions, the true answer), and a real
OpenAI-compatible HTTP server on 127.0.0.1 over a local tiny model."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

#: Every word a demo answer can name (the rule judge's --choices): a right answer names the true one and no other.
DEMO_CHOICES = "red,green,blue,yellow,purple,orange,circle,square,triangle,one,two,three"


@pytest.fixture(scope="session")
def demo_prompts(tmp_path_factory) -> Path:
    """The demo world's annotations (VLFeedback rows with images and a ``truth.answer``), 6 images."""
    from vpa_lightning.data.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("collect") / "demo", num_images=6, bad_records=False)


@pytest.fixture(scope="session")
def served_llava():
    """``vpa serve``'s server over the tiny LLaVA on 127.0.0.1 (a free port), serving in a thread; its /v1 URL and a
    counter of the chat requests it answered."""
    from vpa_lightning.collect.serve import make_server
    from vpa_lightning.models import build_tiny_vlm

    model, processor = build_tiny_vlm("llava")
    server = make_server(model.eval(), processor, "tiny-llava")
    count = {"requests": 0}
    handler = server.RequestHandlerClass
    original = handler.do_POST

    def counted(self):
        count["requests"] += 1
        original(self)

    handler.do_POST = counted
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", count
    server.shutdown()
    server.server_close()
