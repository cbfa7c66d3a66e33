"""Prompts from the files people have: JSON lines, JSON lists, Parquet with embedded images, a vpa-shard build folder;
0..N images each, placeholders placing them; every bad record rejected with file, line and reason."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from vpa_lightning.collect.prompts import read_prompts


def _png(colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format="PNG")
    return out.getvalue()


def test_jsonl_rows_of_every_kind_and_the_rejects(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "b.png").write_bytes(_png((0, 0, 200)))
    rows = [
        {"id": "one", "question": "<image>\nWhat colour?", "image": "a.png", "truth": {"answer": "red"}},
        {"prompt": "Compare <image> and <image> please.", "images": ["a.png", "b.png"]},
        {"id": "text", "query": "Say hello."},  # text-only
        {"id": "chat", "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]}],
         "images": [{"bytes": None, "path": "b.png"}], "completions": [{"response": "dropped"}]},
        {"id": "noq", "image": "a.png"},
        {"id": "missing", "question": "x", "image": "nope.png"},
        {"id": "url", "question": "x", "image": "https://example.com/x.png"},
        {"id": "count", "question": "<image><image> two placeholders", "image": "a.png"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", "[1, 2]"]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    prompts, rejects = read_prompts([path])
    assert [p.id for p in prompts] == ["one", "p:2", "text", "chat"]
    one, two, text, chat = prompts
    assert one.question == "What colour?" and one.offsets is None and one.extra == {"truth": {"answer": "red"}}
    assert one.images == [str(tmp_path / "a.png")]
    assert two.question == "Compare  and  please." and two.offsets == [8, 13] and len(two.images) == 2
    assert two.prompt_text() == "Compare <image> and <image> please."
    assert text.images == [] and text.prompt_text() == "Say hello."
    assert chat.question == "Shape?" and "completions" not in chat.extra
    reasons = {r.source.rsplit(":", 1)[-1]: r.reason for r in rejects}
    assert set(reasons) == {"5", "6", "7", "8", "9", "10"} and len(prompts) + len(rejects) == len(lines)
    assert "no question" in reasons["5"] and "not found" in reasons["6"] and "URL" in reasons["7"]
    assert "2 <image> placeholders for 1 image" in reasons["8"] and "invalid JSON" in reasons["9"]
    assert "not an object" in reasons["10"]
    assert [im.size for im in one.load_images()] == [(16, 16)]


def test_json_list_parquet_with_embedded_images_and_repeated_ids(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    data = _png()
    table = pa.table({"id": ["x", "x"], "question": ["<image>\nQ1", "<image>\nQ2"],
                      "image": [{"bytes": data, "path": "a.png"}, {"bytes": data, "path": "b.png"}]})
    pq.write_table(table, tmp_path / "p.parquet")
    (tmp_path / "l.json").write_text(json.dumps([{"id": "x", "question": "third"}]))
    prompts, rejects = read_prompts([tmp_path / "p.parquet", tmp_path / "l.json"])
    assert not rejects and [p.id for p in prompts] == ["x", "x#2", "x#3"]  # never merged silently
    assert prompts[0].images == [data]


def test_the_prompts_of_a_shard_build(tmp_path: Path) -> None:
    """Any published layout the data core reads, after one vpa-shard build: here the demo's VLFeedback rows."""
    from vpa_lightning.data import build
    from vpa_lightning.data.demo import make_demo

    ann = make_demo(tmp_path / "demo", num_images=4, bad_records=False)
    build([str(ann)], tmp_path / "shards", val_fraction=0.0)
    prompts, rejects = read_prompts([tmp_path / "shards"])
    rows = [json.loads(line) for line in ann.read_text().splitlines()]
    assert not rejects and len(prompts) == len(rows)
    assert {p.question for p in prompts} == {r["prompt"].replace("<image>\n", "") for r in rows}
    assert all(len(p.images) == 1 and p.images[0][:4] == b"\x89PNG" for p in prompts)  # the stored bytes


def test_missing_sources_fail(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such prompts file"):
        read_prompts([tmp_path / "nope.jsonl"])
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_prompts([tmp_path / "dir"])
