"""vpa judge on video prompts (as ``vpa sample`` writes them): the ``openai`` judge sends a video file as a
``video_url`` part and frame folders / frame lists as their frames' ``image_url`` parts, where the prompt had them
(a recording server on 127.0.0.1, and one real ``vpa serve`` of a tiny Qwen2-VL); the ``hf`` judge's rating-token
probabilities are conditioned on the frames (tiny Qwen2-VL: other clip, other scores; the same numbers as a
hand-built processor call); a judge model without video input stops the run before rating anything; a row whose
video cannot be read is rejected with its line while the others are rated."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("av")
pytest.importorskip("torchvision")  # the Qwen2-VL processors need a video processor

from tests.conftest import console_script  # noqa: E402
from tests.videos import encode_frames, encode_video, moving_frames  # noqa: E402
from vpa_lightning.data.video import VideoSampling  # noqa: E402

ASPECTS = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")


def _vpa(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([console_script("vpa"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "VPA_JUDGE_API_KEY": "test-key"})


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _answers() -> list[dict]:
    return [{"model": "m", "response": "A red square moves right."}, {"model": "m", "response": "Nothing moves."}]


@pytest.fixture(scope="module")
def sampled_videos(tmp_path_factory) -> Path:
    """A sampled file in ``vpa sample``'s layout: a video file (line 1), a frame folder placed mid-question (2), a
    frame list (3), an image and a video (4), a corrupt video (5), and a clip unlike the first (6)."""
    root = tmp_path_factory.mktemp("judge_videos")
    (root / "clips").mkdir()
    (root / "clips" / "a.mp4").write_bytes(encode_video(moving_frames(8, (32, 32), seed=1)))
    (root / "clips" / "b.mp4").write_bytes(encode_video(moving_frames(8, (32, 32), seed=7)[::-1].copy()))
    (root / "frames").mkdir()
    for j, data in enumerate(encode_frames(moving_frames(4, (32, 32), seed=2))):
        (root / "frames" / f"frame_{j + 1}.jpg").write_bytes(data)
    (root / "clips" / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)  # an MP4 header, no stream
    from PIL import Image

    Image.new("RGB", (28, 28), (200, 30, 30)).save(root / "red.png")
    base = {"models": ["m"], "completions": _answers(), "img_path": []}
    rows = [
        {**base, "id": "file", "prompt": "<video>\nWhat moves?", "videos": ["clips/a.mp4"]},
        {**base, "id": "folder", "prompt": "In <video> what moves?", "videos": ["frames"]},
        {**base, "id": "list", "prompt": "<video>\nDescribe it.", "videos": [["frames/frame_1.jpg", "frames/frame_2.jpg"]]},
        {**base, "id": "both", "prompt": "Is <image> in <video>?", "img_path": "red.png", "videos": ["clips/a.mp4"]},
        {**base, "id": "corrupt", "prompt": "<video>\nWhat moves?", "videos": ["clips/bad.mp4"]},
        {**base, "id": "other", "prompt": "<video>\nWhat moves?", "videos": ["clips/b.mp4"]},
    ]
    path = root / "sampled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ openai: a recording server
class _Recorder(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that records each request body and answers with a valid vlfeedback rating."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        reply = "\n".join(f"### {a}\nRating: 4\nRationale: recorded." for a in ASPECTS)
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _user_parts(body: dict) -> list[dict]:
    (turn,) = [m for m in body["messages"] if m["role"] == "user"]
    return turn["content"]


def test_openai_judge_sends_the_videos_where_the_prompt_had_them(sampled_videos, tmp_path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.seen.clear()
    out = tmp_path / "judged.jsonl"
    try:
        proc = _vpa("judge", str(sampled_videos), "--judge", "openai", "--base-url",
                    f"http://127.0.0.1:{server.server_address[1]}/v1", "--model", "gpt-judge", "--cache-dir",
                    str(tmp_path / "cache"), "--video-max-frames", "4", "--out", str(out))
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = sampled_videos.parent
    by_answer: dict[str, list[list[dict]]] = {}
    for body in _Recorder.seen:
        parts = _user_parts(body)
        text = "".join(p.get("text", "") for p in parts)
        by_answer.setdefault(text, []).append(parts)
    assert len(_Recorder.seen) == 5 * 2  # 5 readable rows, 2 answers each; the corrupt row is never sent

    def request(question: str) -> list[dict]:
        (parts,) = [ps[0] for text, ps in by_answer.items() if question in text and "A red square" in text]
        return parts

    def video_bytes(part: dict) -> bytes:
        url = part["video_url"]["url"]
        assert url.startswith("data:video/mp4;base64,")
        return base64.b64decode(url.split(",", 1)[1])

    file_parts = request("What moves?\n")  # rows "file" and "other" share the text: the first sent is "file"
    assert [p["type"] for p in file_parts] == ["video_url", "text"]
    all_files = {video_bytes(p) for body in _Recorder.seen for p in _user_parts(body) if p["type"] == "video_url"}
    assert all_files == {(root / "clips" / n).read_bytes() for n in ("a.mp4", "b.mp4")}
    assert video_bytes(file_parts[0]) == (root / "clips" / "a.mp4").read_bytes()
    folder = request("what moves?")
    assert [p["type"] for p in folder] == ["text"] + ["image_url"] * 4 + ["text"]
    assert folder[0]["text"].endswith("Question: In ") and folder[-1]["text"].startswith(" what moves?")
    assert [p["type"] for p in request("Describe it.")] == ["image_url", "image_url", "text"]
    both = request("Is  in ?")
    assert [p["type"] for p in both] == ["text", "image_url", "text", "video_url", "text"]
    assert both[0]["text"].endswith("Question: Is ") and both[2]["text"] == " in "
    assert both[1]["image_url"]["url"].startswith("data:image/png;base64,")
    judged = _rows(out)
    assert all(c["annotations"]["Helpfulness"]["Rating"] == 4.0 for r in judged if r["id"] != "corrupt"
               for c in r["completions"])
    assert judged[4]["id"] == "corrupt" and all("annotations" not in c for c in judged[4]["completions"])
    (reject,) = _rows(tmp_path / "judged.jsonl.rejects.jsonl")
    assert reject["source"] == f"{sampled_videos}:5" and "bad.mp4" in reject["reason"]
    summary = json.loads((tmp_path / "judged.jsonl.summary.json").read_text())
    assert (summary["prompts"], summary["records_rejected"], summary["completions"], summary["rated"]) == (6, 1, 10, 10)


def test_openai_judge_through_vpa_serve_of_a_tiny_qwen2_vl(sampled_videos, tmp_path) -> None:
    """A real ``vpa serve`` over a tiny Qwen2-VL: the judge's ``video_url`` request reaches the model's vision tower
    and comes back answered (a random tiny model's reply is no rating: a reject with the parse reason, not an
    HTTP error)."""
    from vpa_lightning.collect.judge import _OpenAIJudge
    from vpa_lightning.collect.prompts import _record
    from vpa_lightning.collect.rubrics import RubricError, load_rubric
    from vpa_lightning.collect.serve import make_server
    from vpa_lightning.eval.judge import JudgeClient
    from vpa_lightning.models import build_tiny_vlm

    model, processor = build_tiny_vlm("qwen2_vl")
    seen: list[tuple] = []
    hook = model.model.visual.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    server = make_server(model.eval(), processor, "tiny-qwen")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = JudgeClient(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="tiny-qwen",
                             api_key="EMPTY", cache_dir=str(tmp_path / "cache"), max_tokens=8)
        judge = _OpenAIJudge(load_rubric("vlfeedback"), client, VideoSampling(max_frames=4))
        row = _rows(sampled_videos)[0]
        prompt = _record(row, f"{sampled_videos}:1", sampled_videos.parent, row["id"])
        judge.load(prompt)
        rated = judge.rate(prompt, [c["response"] for c in row["completions"]])
        counters = dict(client.counters)
        client.close()
    finally:
        hook.remove()
        server.shutdown()
        server.server_close()
    assert len(rated) == 2 and all(isinstance(r, RubricError) and "reply:" in str(r) for r in rated)
    assert counters["requests_sent"] == 2 and seen  # the video went through the vision tower


# ------------------------------------------------------------------ hf: tiny Qwen2-VL
@pytest.fixture(scope="module")
def hf_judge():
    from vpa_lightning.collect.judge import _HFJudge
    from vpa_lightning.collect.rubrics import load_rubric

    return _HFJudge(load_rubric("vlfeedback"), "tiny:qwen2_vl", None, "cpu", VideoSampling(max_frames=4))


def _prompt(path: Path, n: int):
    from vpa_lightning.collect.prompts import _record

    row = _rows(path)[n - 1]
    return _record(row, f"{path}:{n}", path.parent, row["id"])


def test_hf_judge_scores_are_conditioned_on_the_frames(sampled_videos, hf_judge) -> None:
    answers = [c["response"] for c in _answers()]
    first, other = _prompt(sampled_videos, 1), _prompt(sampled_videos, 6)
    assert first.question == other.question and first.videos != other.videos
    a = hf_judge.rate(first, answers, hf_judge.load(first))
    b = hf_judge.rate(other, answers, hf_judge.load(other))
    assert all(set(r) == set(ASPECTS) for r in a + b)
    assert a != b  # the same answers, another clip: other scores
    assert hf_judge.rate(first, answers, hf_judge.load(first)) == a  # deterministic
    from dataclasses import replace

    blind = replace(first, videos=[], video_offsets=None)
    assert hf_judge.rate(blind, answers, hf_judge.load(blind)) != a

    # the same numbers as a hand-built processor call: the chat template with a video block, the sampled frames
    import torch

    (clip,) = hf_judge.load(first)[1]
    assert clip.num_frames == 4
    processor, model = hf_judge.processor, hf_judge.model
    rubric = hf_judge.rubric
    for j, aspect in enumerate(ASPECTS):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": rubric.aspect_request(
                first.question, answers[0], aspect)}]}], add_generation_prompt=True, tokenize=False)
        enc = processor(text=[text], videos=[clip.frames], return_tensors="pt",
                        videos_kwargs={"do_sample_frames": False, "video_metadata": [clip.metadata()]})
        with torch.no_grad():
            probs = torch.softmax(model(**enc).logits[0, -1].float(), dim=-1)
        picked = probs[hf_judge.tokens]
        expected = float((picked * picked.new_tensor(hf_judge.values)).sum() / picked.sum())
        assert a[0][aspect][0] == pytest.approx(expected, abs=2e-4), aspect


def test_vpa_judge_hf_rates_video_rows_and_rejects_a_bad_one(sampled_videos, tmp_path) -> None:
    out = tmp_path / "judged.jsonl"
    proc = _vpa("judge", str(sampled_videos), "--judge", "hf", "--model", "tiny:qwen2_vl", "--video-max-frames", "4",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    judged = _rows(out)
    assert [r["videos"] for r in judged] == [r["videos"] for r in _rows(sampled_videos)]  # passed along
    for row in judged:
        for c in row["completions"]:
            if row["id"] == "corrupt":
                assert "annotations" not in c
            else:
                assert set(c["annotations"]) == set(ASPECTS)
                assert all(1.0 <= v["Rating"] <= 5.0 for v in c["annotations"].values())
    (reject,) = _rows(tmp_path / "judged.jsonl.rejects.jsonl")
    assert reject["source"] == f"{sampled_videos}:5" and "bad.mp4" in reject["reason"]
    summary = json.loads((tmp_path / "judged.jsonl.summary.json").read_text())
    assert (summary["prompts"], summary["records_rejected"], summary["completions"], summary["rated"],
            summary["rejected"]) == (6, 1, 10, 10, 0)
    # other frames, other ratings: the sampling flags reach the judge (and a fresh part, not the first run's)
    again = tmp_path / "again.jsonl"
    proc = _vpa("judge", str(sampled_videos), "--judge", "hf", "--model", "tiny:qwen2_vl", "--video-max-frames", "2",
                "--out", str(again))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(again)[0]["completions"] != judged[0]["completions"]
    proc = _vpa("judge", str(sampled_videos), "--judge", "hf", "--model", "tiny:qwen2_vl", "--video-fps", "-1",
                "--out", str(tmp_path / "x.jsonl"))
    assert proc.returncode == 2 and "--video-fps" in proc.stderr


def test_vpa_judge_hf_with_a_model_without_video_stops_before_rating(sampled_videos, tmp_path) -> None:
    out = tmp_path / "judged.jsonl"
    proc = _vpa("judge", str(sampled_videos), "--judge", "hf", "--model", "tiny:llava", "--out", str(out))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "qwen2_vl" in proc.stderr and "llava" in proc.stderr and "video" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "judged.jsonl.parts").exists()  # nothing rated, nothing written


def test_hf_judge_runs_a_prompts_video_once_for_all_its_rows(sampled_videos, hf_judge) -> None:
    """The answers x aspects rows share the prompt's video and question: the vision tower sees one clip's patches,
    and the scores are those of the rows run whole (the shared-prefix path off)."""
    from unittest import mock

    from vpa_lightning.models.generation import encode_for_generation

    answers = [c["response"] for c in _answers()]
    prompt = _prompt(sampled_videos, 1)
    media = hf_judge.load(prompt)
    patches: list[int] = []
    visual = hf_judge.model.model.visual
    handle = visual.register_forward_hook(lambda mod, args, out: patches.append(int(args[0].shape[0])))
    try:
        shared = hf_judge.rate(prompt, answers, media)
    finally:
        handle.remove()
    one = encode_for_generation(hf_judge.processor, [[]], ["x"], videos=[media[1]])
    assert patches == [one["pixel_values_videos"].shape[0]]  # one clip, not len(answers) x 3 of them
    with mock.patch("vpa_lightning.models.generation.shared_prefix_next_logits", return_value=None):
        whole = hf_judge.rate(prompt, answers, media)
    for a, b in zip(shared, whole):
        for aspect in ASPECTS:
            assert a[aspect][0] == pytest.approx(b[aspect][0], abs=1e-4)
