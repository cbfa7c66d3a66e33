"""vpa sample on video prompts (tiny Qwen2-VL): ``videos`` / ``video`` fields (a video file, a frame folder, a frame
list; ``<video>`` placeholders), K answers per prompt with one vision pass, a bad video rejected with file, line and
reason while the rest are sampled, the output keeping the videos so that ``vpa judge`` and ``vpa-shard build`` read
them back; the OpenAI chat parts of a video prompt."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("av")
pytest.importorskip("torchvision")  # the Qwen2-VL processors need a video processor

from tests.conftest import console_script  # noqa: E402
from tests.videos import encode_frames, encode_video, moving_frames  # noqa: E402
from vpa_lightning.collect.prompts import read_prompts  # noqa: E402
from vpa_lightning.collect.sample import SampleSettings, chat_messages, hf_sample  # noqa: E402
from vpa_lightning.data.video import VideoSampling  # noqa: E402


def _vpa(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("vpa"), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def video_prompts(tmp_path_factory) -> Path:
    """A JSONL of video prompts: a file under ``videos``, a frame folder under ``video`` with a placeholder in the
    middle, a frame list, an image + video; then a corrupt video (line 5) and a missing one (line 6)."""
    root = tmp_path_factory.mktemp("video_prompts")
    (root / "clips").mkdir()
    (root / "clips" / "a.mp4").write_bytes(encode_video(moving_frames(8, (32, 32), seed=1)))
    (root / "frames").mkdir()
    for j, data in enumerate(encode_frames(moving_frames(4, (32, 32), seed=2))):
        (root / "frames" / f"frame_{j + 1}.jpg").write_bytes(data)  # frame_1 ... frame_4, natural order
    (root / "clips" / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)  # an MP4 header, no stream
    from PIL import Image

    Image.new("RGB", (28, 28), (200, 30, 30)).save(root / "red.png")
    rows = [
        {"id": "file", "question": "<video>\nWhat moves?", "videos": ["clips/a.mp4"], "truth": {"answer": "square"}},
        {"id": "folder", "question": "In <video> what moves?", "video": "frames", "truth": {"answer": "bar"}},
        {"id": "list", "prompt": "Describe it.", "videos": [[f"frames/frame_{j}.jpg" for j in (1, 2, 3)]]},
        {"id": "both", "question": "Is <image> in <video>?", "image": "red.png", "videos": "clips/a.mp4"},
        {"id": "corrupt", "question": "What moves?", "videos": ["clips/bad.mp4"]},
        {"id": "missing", "question": "What moves?", "videos": ["clips/none.mp4"]},
    ]
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_video_prompts_are_read_with_their_placeholders(video_prompts) -> None:
    prompts, rejects = read_prompts([video_prompts])
    assert [p.id for p in prompts] == ["file", "folder", "list", "both", "corrupt"]
    by_id = {p.id: p for p in prompts}
    root = video_prompts.parent
    assert by_id["file"].videos == [str(root / "clips" / "a.mp4")] and by_id["file"].video_offsets is None
    assert by_id["file"].prompt_text() == "<video>\nWhat moves?"
    folder = by_id["folder"]
    assert folder.question == "In  what moves?" and folder.video_offsets == [3] and folder.offsets is None
    assert folder.prompt_text() == "In <video> what moves?"
    both = by_id["both"]
    assert (both.question, both.offsets, both.video_offsets) == ("Is  in ?", [3], [7])
    assert both.prompt_text() == "Is <image> in <video>?"
    sampling = VideoSampling(fps=None, max_frames=4)
    (clip,) = folder.load_videos(sampling)
    assert clip.frames.shape == (4, 32, 32, 3)
    (listed,) = by_id["list"].load_videos(sampling)
    assert listed.num_frames == 3
    import numpy as np

    assert np.abs(listed.frames.astype(int) - clip.frames[:3].astype(int)).mean() < 3  # the same frames, in order
    with pytest.raises(ValueError, match="bad.mp4"):
        by_id["corrupt"].load_videos(sampling)
    (reject,) = rejects
    assert reject.source.endswith("prompts.jsonl:6") and "video not found" in reject.reason


def test_k_answers_to_a_video_prompt_with_one_vision_pass(video_prompts) -> None:
    from vpa_lightning.models import build_tiny_vlm

    model, processor = build_tiny_vlm("qwen2_vl")
    prompt = read_prompts([video_prompts])[0][1]  # the frame folder, placeholder mid-question
    calls = []
    hook = model.model.visual.register_forward_hook(lambda m, a, k: calls.append(1))
    sampling = VideoSampling(max_frames=4)
    try:
        settings = SampleSettings(k=4, temperature=1.0, top_p=1.0, max_new_tokens=10)
        first = hf_sample(model, processor, prompt, settings, seed=3, video_sampling=sampling)
    finally:
        hook.remove()
    assert len(calls) == 1  # one vision pass (the video) for the prompt's 4 answers
    assert len(first) == 4 and len({t for t, _ in first}) > 1
    assert hf_sample(model, processor, prompt, settings, seed=3, video_sampling=sampling) == first
    llava, llava_processor = build_tiny_vlm("llava")
    from vpa_lightning.errors import VideoUnsupportedError

    with pytest.raises(VideoUnsupportedError, match="qwen2_vl"):
        hf_sample(llava, llava_processor, prompt, settings, seed=3, video_sampling=sampling)


def test_vpa_sample_video_prompts_judge_and_build_keep_the_videos(video_prompts, tmp_path) -> None:
    out = tmp_path / "sampled.jsonl"
    proc = _vpa("sample", str(video_prompts), "--model", "q=tiny:qwen2_vl", "--k", "2", "--max-new-tokens", "4",
                "--video-max-frames", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["file", "folder", "list", "both"]
    root = video_prompts.parent
    for row in rows:
        assert len(row["completions"]) == 2 and all(isinstance(c["response"], str) for c in row["completions"])
    by_id = {r["id"]: r for r in rows}
    assert (out.parent / by_id["file"]["videos"][0]).resolve() == (root / "clips" / "a.mp4").resolve()
    assert (out.parent / by_id["folder"]["videos"][0]).resolve() == (root / "frames").resolve()
    assert [(out.parent / f).resolve() for f in by_id["list"]["videos"][0]] == [(root / "frames" / f"frame_{j}.jpg").resolve()
                                                                               for j in (1, 2, 3)]
    assert by_id["folder"]["prompt"] == "In <video> what moves?" and by_id["folder"]["truth"] == {"answer": "bar"}
    assert by_id["both"]["prompt"] == "Is <image> in <video>?" and "img_path" in by_id["both"]
    rejects = [json.loads(line) for line in (tmp_path / "sampled.jsonl.rejects.jsonl").read_text().splitlines()]
    assert sorted(r["source"].rsplit(":", 1)[-1] for r in rejects) == ["5", "6"]
    corrupt = next(r for r in rejects if r["source"].endswith(":5"))
    assert "bad.mp4" in corrupt["reason"] and corrupt["source"].startswith(str(video_prompts))
    summary = json.loads((tmp_path / "sampled.jsonl.summary.json").read_text())
    assert (summary["prompts_in"], summary["sampled"], summary["rejected"], summary["completions"]) == (6, 4, 2, 8)

    # vpa judge passes the videos along; the judged file builds into shards that hold them
    judged = tmp_path / "judged.jsonl"
    proc = _vpa("judge", str(out), "--judge", "rule", "--reference", "truth.answer", "--out", str(judged))
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    assert [json.loads(line).get("videos") for line in judged.read_text().splitlines()] == [r["videos"] for r in rows]
    rated = []
    for row in rows:  # distinct ratings, so that every prompt gives a pair
        row = dict(row, completions=[dict(c, annotations={"Helpfulness": {"Rating": str(5 - i), "Rationale": "."}})
                                     for i, c in enumerate(row["completions"])])
        row["completions"][1]["response"] += " (second)"
        rated.append(json.dumps(row))
    (tmp_path / "rated.jsonl").write_text("\n".join(rated) + "\n")
    from vpa_lightning.data import build

    manifest = build([str(tmp_path / "rated.jsonl")], tmp_path / "shards", aspects="Helpfulness")
    assert manifest["counts"]["records_rejected"] == 0, (tmp_path / "shards" / "rejects.jsonl").read_text()
    import tarfile

    metas = []
    for tar in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            names = tf.getnames()
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    metas.append(meta)
                    for v in meta.get("videos", []):
                        assert all(f"{meta['key']}.{member}" in names for member in v["members"])
    kinds = sorted(tuple(v["kind"] for v in m.get("videos", [])) for m in metas)
    assert kinds == [("file",), ("file",), ("frames",), ("frames",)]


def test_openai_chat_of_a_video_prompt(video_prompts) -> None:
    prompts = {p.id: p for p in read_prompts([video_prompts])[0]}
    (turn,) = chat_messages(prompts["both"])
    kinds = [part["type"] for part in turn["content"]]
    assert kinds == ["text", "image_url", "text", "video_url", "text"]
    url = turn["content"][3]["video_url"]["url"]
    assert url.startswith("data:video/mp4;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == (video_prompts.parent / "clips" / "a.mp4").read_bytes()
    (turn,) = chat_messages(prompts["folder"])  # a frame folder: its frames as images, in order
    assert [p["type"] for p in turn["content"]] == ["text"] + ["image_url"] * 4 + ["text"]


def test_openai_backend_video_prompts_through_vpa_serve(video_prompts, tmp_path) -> None:
    """``vpa sample --backend openai`` against ``vpa serve``'s server over a tiny Qwen2-VL: video files go as
    ``video_url`` data URLs and are answered on their frames; frame folders as their frames' images."""
    import threading

    from vpa_lightning.collect.sample import PoolModel, run_sample
    from vpa_lightning.collect.serve import make_server, request_prompt
    from vpa_lightning.models import build_tiny_vlm

    model, processor = build_tiny_vlm("qwen2_vl")
    prompts = {p.id: p for p in read_prompts([video_prompts])[0]}
    served = request_prompt(chat_messages(prompts["both"]))
    assert served.videos == [(video_prompts.parent / "clips" / "a.mp4").read_bytes()]
    assert (served.question, served.offsets, served.video_offsets) == ("Is  in ?", [3], [7])
    server = make_server(model.eval(), processor, "tiny-qwen")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        spec = PoolModel(name="q", model="tiny-qwen", backend="openai",
                         base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="EMPTY")
        spec.settings.k, spec.settings.max_new_tokens = 2, 4
        summary = run_sample([str(video_prompts)], [spec], tmp_path / "o.jsonl", cache_dir=str(tmp_path / "cache"),
                             video_sampling=VideoSampling(max_frames=4))
    finally:
        server.shutdown()
        server.server_close()
    assert (summary["sampled"], summary["rejected"], summary["completions"]) == (4, 2, 8)
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert all(len(r["completions"]) == 2 and r["videos"] for r in rows)
