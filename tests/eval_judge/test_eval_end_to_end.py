"""`vpa eval` with a judge-scored benchmark: a tiny VLM answers MM-Vet questions, the loopback stub judges."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.eval_judge.test_judge import StubJudge


def test_vpa_eval_mmvet_through_the_stub_judge(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from vpa_lightning.cli import main

    images = tmp_path / "images"
    images.mkdir()
    data = {}
    for i in range(3):
        Image.new("RGB", (32 + 8 * i, 32), (60 * i, 90, 200 - 50 * i)).save(images / f"v1_{i}.png")
        data[f"v1_{i}"] = {"imagename": f"v1_{i}.png", "question": f"What colour is {i}?", "answer": "blue", "capability": ["rec"]}
    data["v1_3"] = {"imagename": "missing.png", "question": "?", "answer": "x", "capability": ["ocr"]}
    (tmp_path / "mm-vet.json").write_text(json.dumps(data))

    stub = StubJudge(reply=lambda body: "0.6")
    try:
        monkeypatch.setenv("VPA_JUDGE_BASE_URL", stub.url)
        monkeypatch.setenv("VPA_JUDGE_API_KEY", "test-key")
        config = {
            "models": [{"name": "base", "path": "tiny:llava"}, {"name": "again", "path": "tiny:llava"}],
            "benchmarks": [
                {
                    "name": "mmvet",
                    "file": str(tmp_path / "mm-vet.json"),
                    "image_root": str(images),
                    "judge": {"model": "judge-model", "cache_dir": str(tmp_path / "judge-cache"), "max_concurrency": 2},
                }
            ],
            "out_dir": str(tmp_path / "out"),
            "max_new_tokens": 4,
            "device": "cpu",
        }
        (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
        results = main(["eval", "--config", str(tmp_path / "eval.yaml")])
        # every answer graded 0.6 -> rec = total = 60; the missing image is a reject by entry number
        for model in ("base", "again"):
            assert results["models"][model]["mmvet"] == {"rec": 60.0, "total": 60.0, "unparsed": 0.0}
        assert [r["line"] for r in results["rejects"]["mmvet"]] == [4]
        assert json.loads((tmp_path / "out" / "results.json").read_text())["models"] == results["models"]
        bodies = [r["body"] for r in stub.requests]
        assert {b["model"] for b in bodies} == {"judge-model"}
        assert all(r["headers"]["Authorization"] == "Bearer test-key" for r in stub.requests)
        # identical models give identical answers: the second model's judgements come from the cache
        assert len(bodies) == 3
        sent = len(stub.requests)
        main(["eval", "--config", str(tmp_path / "eval.yaml")])
        assert len(stub.requests) == sent  # a rerun never pays twice
    finally:
        stub.close()
