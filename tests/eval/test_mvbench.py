"""MVBench in ``vpa eval``: its published layout (``json/<task>.json`` lists, videos under each task's folder of
``video/``: mp4 and GIF files, TVQA-style frame folders, ``start``/``end`` bounds), every bad entry rejected with
its line, scoring from the parsed letters, clips decoded a batch at a time, and the ``vpa`` console script with a
tiny Qwen2-VL (a results table per task) and with a model that takes no video (refused, naming the families)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

from tests.videos import encode_video, moving_frames  # noqa: E402
from vpa_lightning.data.video import VideoSampling  # noqa: E402
from vpa_lightning.eval.benchmarks import MVBENCH_TASKS, MVBench, build_benchmark  # noqa: E402
from vpa_lightning.eval.video import EvalVideo  # noqa: E402

TASKS = ["action_sequence", "object_existence", "episodic_reasoning"]
SIZE = (56, 56)


def _write_list(path: Path, entries: list[object]) -> Path:
    """A JSON list with entry ``k`` (1-based) on line ``k + 1``: the line numbers a reject must give."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(e if isinstance(e, str) else json.dumps(e) for e in entries)
    path.write_text("[\n" + body + "\n]\n")
    return path


def _gif(frames: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=250, loop=0)
    return buf.getvalue()


def _frame_folder(folder: Path, frames: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames, 1):  # TVQA's frames_fps3_hq names: 00001.jpg, 00002.jpg, ...
        Image.fromarray(f).save(folder / f"{i:05d}.jpg", quality=95)
    return folder


def write_mvbench(root: Path) -> Path:
    """Three tasks of MVBench in its layout; the good entries' answers are listed in :data:`GOOD`."""
    video = root / "video"
    star = video / MVBENCH_TASKS["action_sequence"][0]
    clevrer = video / MVBENCH_TASKS["object_existence"][0]
    tvqa = video / MVBENCH_TASKS["episodic_reasoning"][0]
    for d in (star, clevrer):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(3):  # 8 frames at 4 fps: 2 s
        (star / f"clip{i}.mp4").write_bytes(encode_video(moving_frames(8, SIZE, seed=i), fps=4))
    (clevrer / "video_10000.mp4").write_bytes(encode_video(moving_frames(6, SIZE, seed=5), fps=4))
    (clevrer / "video_10001.gif").write_bytes(_gif(moving_frames(6, SIZE, seed=6)))
    (clevrer / "video_10002.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a real video")  # fails at decode
    _frame_folder(tvqa / "s01e01_seg01_clip_00", moving_frames(9, SIZE, seed=7))
    (tvqa / "empty_clip").mkdir(parents=True)

    seq = "What did the person do first?"
    _write_list(root / "json" / "action_sequence.json", [
        {"video": "clip0.mp4", "question": seq, "candidates": ["Opened the door.", "Sat down.", "Ate."],
         "answer": "Sat down.", "start": 0.5, "end": 1.5},                                   # 2 good (B)
        {"video": "clip1.mp4", "question": seq, "candidates": ["Ran.", "Slept."], "answer": "Ran.",
         "start": 0.0, "end": 9.0},                                                          # 3 good (A)
        '"not an object"',                                                                   # 4
        {"video": "clip2.mp4", "candidates": ["a", "b"], "answer": "a", "start": 0, "end": 1},  # 5 no question
        {"video": "clip2.mp4", "question": seq, "candidates": ["a", "b"], "answer": "c", "start": 0, "end": 1},  # 6
        {"video": "missing.mp4", "question": seq, "candidates": ["a", "b"], "answer": "a", "start": 0, "end": 1},  # 7
        {"video": "clip2.mp4", "question": seq, "candidates": ["a", "b"], "answer": "a"},     # 8 no bound
        {"video": "clip2.mp4", "question": seq, "candidates": ["a", "b"], "answer": "a", "start": 2, "end": 1},  # 9
        {"video": "clip2.mp4", "question": seq, "candidates": ["a"], "answer": "a", "start": 0, "end": 1},  # 10
        {"video": "clip2.mp4", "question": seq, "candidates": ["a", "a"], "answer": "a", "start": 0, "end": 1},  # 11
    ])
    ex = "Are there any metal objects?"
    _write_list(root / "json" / "object_existence.json", [
        {"video": "video_10000.mp4", "question": ex, "candidates": ["yes", "no"], "answer": "no",
         "start": 99, "end": 100},                                                           # 2 good (B), bound ignored
        {"video": "video_10001.gif", "question": ex, "candidates": ["yes", "no"], "answer": "yes"},  # 3 good (A), gif
        {"video": "video_10002.mp4", "question": ex, "candidates": ["0", 1, "2"], "answer": 1},  # 4 undecodable (B)
    ])
    ep = "Why is Sheldon angry?"
    _write_list(root / "json" / "episodic_reasoning.json", [
        {"video": "s01e01_seg01_clip_00", "question": ep, "candidates": ["His spot.", "Rain.", "Exam.", "Food."],
         "answer": "Exam.", "start": 1.0, "end": 2.0},                                        # 2 good (C), frames
        {"video": "empty_clip", "question": ep, "candidates": ["x", "y"], "answer": "x", "start": 0, "end": 1},  # 3
        '{"video": "s01e01_seg01_clip_00", "question": "broken',                              # 4 malformed
    ])
    return root


#: id -> correct letter of the usable entries (the undecodable one included: it is rejected at generation)
GOOD = {"action_sequence/1": "B", "action_sequence/2": "A", "object_existence/1": "B", "object_existence/2": "A",
        "object_existence/3": "B", "episodic_reasoning/1": "C"}


@pytest.fixture(scope="module")
def mvbench_root(tmp_path_factory) -> Path:
    return write_mvbench(tmp_path_factory.mktemp("MVBench"))


def test_reads_the_published_layout_and_rejects_by_line(mvbench_root: Path) -> None:
    bench = build_benchmark({"name": "mvbench", "root": str(mvbench_root), "tasks": TASKS})
    assert isinstance(bench, MVBench)
    items, rejects = bench.load()
    # round robin over the tasks, so --limit covers every task
    assert [it.item_id for it in items] == [
        "action_sequence/1", "object_existence/1", "episodic_reasoning/1", "action_sequence/2",
        "object_existence/2", "object_existence/3",
    ]
    assert {it.item_id: it.meta["answer"] for it in items} == GOOD
    first = items[0]
    assert first.image is None and first.meta["line"] == 2
    assert first.question == (
        "Question: What did the person do first?\nOptions:\n(A) Opened the door.\n(B) Sat down.\n(C) Ate.\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert first.video == EvalVideo((mvbench_root / "video/star/Charades_v1_480/clip0.mp4").absolute(), (0.5, 1.5))
    by_id = {it.item_id: it for it in items}
    assert by_id["object_existence/1"].video.bound is None  # a task without bounds ignores start/end
    assert by_id["object_existence/3"].meta["options"] == {"A": "0", "B": "1", "C": "2"}  # numbers as written
    frames = by_id["episodic_reasoning/1"].video
    assert frames.path.is_dir() and frames.bound == (1.0, 2.0) and frames.frame_fps == 3.0
    got = sorted((Path(r.file).name, r.line, r.reason) for r in rejects)
    assert [(f, line) for f, line, _ in got] == [
        ("action_sequence.json", n) for n in range(4, 12)
    ] + [("episodic_reasoning.json", 3), ("episodic_reasoning.json", 4)]
    reasons = dict(((f, line), reason) for f, line, reason in got)
    assert "not a JSON object" in reasons[("action_sequence.json", 4)]
    assert "missing field 'question'" in reasons[("action_sequence.json", 5)]
    assert "answer 'c' is not among the candidates" in reasons[("action_sequence.json", 6)]
    assert "video not found" in reasons[("action_sequence.json", 7)] and "missing.mp4" in reasons[("action_sequence.json", 7)]
    assert "missing field 'start'" in reasons[("action_sequence.json", 8)]
    assert "ends (1.0 s) before it starts (2.0 s)" in reasons[("action_sequence.json", 9)]
    assert "at least 2" in reasons[("action_sequence.json", 10)]
    assert "repeat" in reasons[("action_sequence.json", 11)]
    assert "holds no frame images" in reasons[("episodic_reasoning.json", 3)]
    assert reasons[("episodic_reasoning.json", 4)].startswith("malformed JSON")
    assert all(r.startswith("entry ") for (f, n), r in reasons.items() if n != 4 or f != "episodic_reasoning.json")


def test_missing_task_file_and_bad_arguments(tmp_path: Path, mvbench_root: Path) -> None:
    items, rejects = MVBench(str(mvbench_root)).load()  # all 20 tasks: 17 files are missing
    assert len(items) == 6
    missing = [r for r in rejects if r.line == 0]
    assert len(missing) == 17 and all("cannot read file" in r.reason for r in missing)
    with pytest.raises(ValueError, match="unknown MVBench task"):
        MVBench(str(mvbench_root), tasks=["action_sequence", "nope"])
    with pytest.raises(ValueError, match="frame_fps"):
        MVBench(str(mvbench_root), frame_fps=0)


def test_bounds_frame_folders_and_gif_decode_the_right_frames(mvbench_root: Path) -> None:
    every = VideoSampling(fps=None, max_frames=None)
    star = mvbench_root / "video/star/Charades_v1_480/clip0.mp4"
    whole = EvalVideo(star).load(every)
    assert whole.num_frames == 8 and whole.fps == 4.0
    part = EvalVideo(star, (0.5, 1.5)).load(every)  # frames 2..6 of 8 at 4 fps, counted as the clip's source
    assert part.total_frames == 5 and part.indices == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(part.frames, whole.frames[2:7])
    sampled = EvalVideo(star, (0.5, 1.5)).load(VideoSampling(fps=2.0, max_frames=16))
    np.testing.assert_array_equal(sampled.frames, whole.frames[[2, 4]])
    assert EvalVideo(star, (0.0, 60.0)).load(every).num_frames == 8  # an end past the video stops at its end
    folder = mvbench_root / "video/tvqa/frames_fps3_hq/s01e01_seg01_clip_00"
    clip = EvalVideo(folder, (1.0, 2.0), frame_fps=3.0).load(every)  # 3 fps: frames 3..6 (0-based) of 9
    assert clip.num_frames == 4 and clip.fps == 3.0
    from PIL import Image

    expected = np.stack([np.asarray(Image.open(folder / f"{i:05d}.jpg").convert("RGB")) for i in (4, 5, 6, 7)])
    np.testing.assert_array_equal(clip.frames, expected)
    gif = EvalVideo(mvbench_root / "video/clevrer/video_validation/video_10001.gif").load(every)
    assert gif.num_frames == 6
    from vpa_lightning.data.samples import SampleError

    with pytest.raises(SampleError, match="past its end"):
        EvalVideo(star, (5.0, 6.0)).load(every)


def test_scores_the_parsed_letters(mvbench_root: Path) -> None:
    bench = MVBench(str(mvbench_root), tasks=TASKS)
    items, _ = bench.load()
    answers = {  # right, right, wrong, unparsed, right by the option's text, wrong
        "action_sequence/1": "(B) Sat down.",
        "action_sequence/2": "The answer is A",
        "object_existence/1": "A",
        "object_existence/2": "hmm",
        "object_existence/3": "1",
        "episodic_reasoning/1": "B. Rain.",
    }
    got = bench.score(items, [answers[it.item_id] for it in items])
    assert [bench.parse(it, answers[it.item_id]) for it in items] == ["B", "A", "B", "A", None, "B"]
    assert got["accuracy/action_sequence"] == 1.0
    assert got["accuracy/object_existence"] == pytest.approx(1 / 3)
    assert got["accuracy/episodic_reasoning"] == 0.0
    assert got["accuracy"] == pytest.approx(3 / 6)
    assert got["task_mean"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert got["unparsed"] == pytest.approx(1 / 6) and got["n"] == 6


def test_runner_decodes_a_batch_at_a_time_and_rejects_undecodable_videos(
    tmp_path: Path, mvbench_root: Path, monkeypatch
) -> None:
    import vpa_lightning.models.generation as generation
    from vpa_lightning.eval import runner

    events: list[str] = []
    load = EvalVideo.load

    def counting_load(self, sampling):
        events.append("decode")
        assert sampling == VideoSampling(fps=1.0, max_frames=3, max_pixels=900)
        return load(self, sampling)

    def fake_generate(model, processor, images, questions, *, videos, video_max_pixels, batch_size, **kw):
        events.append(f"answer {len(questions)}")
        assert video_max_pixels == 900 and all(v[0].num_frames <= 3 for v in videos)
        assert batch_size == len(questions) <= 2
        # the correct letter for action_sequence, "A" elsewhere
        return ["(B)" if "first?" in q and "Sat down" in q else "A" for q in questions]

    monkeypatch.setattr(EvalVideo, "load", counting_load)
    monkeypatch.setattr(generation, "generate_answers", fake_generate)
    bench = MVBench(str(mvbench_root), tasks=TASKS)
    results = runner.evaluate(
        [{"name": "q", "path": "tiny:qwen2_vl"}, {"name": "q2", "path": "tiny:qwen2_vl"}], [bench], tmp_path,
        batch_size=2, device="cpu", print_table=False, video_fps=1.0, video_max_frames=3, video_max_pixels=900,
    )
    per_model = ["decode", "decode", "answer 2", "decode", "decode", "answer 2", "decode", "decode", "answer 1"]
    # model 2 skips the video that failed for model 1 (6 items, 1 undecodable: 5 decoded, never all at once)
    assert events == per_model + ["decode", "decode", "answer 2", "decode", "decode", "answer 2", "decode", "answer 1"]
    m = results["models"]["q"]["mvbench"]
    # answered "(B)", "A", "A", "A", "A": right on action_sequence/1 and /2 and object_existence/2
    assert m["accuracy/action_sequence"] == 1.0 and m["accuracy/object_existence"] == 0.5
    assert m["accuracy/episodic_reasoning"] == 0.0 and m["accuracy"] == pytest.approx(3 / 5) and m["n"] == 5
    assert results["models"]["q2"]["mvbench"] == m
    undecodable = [r for r in results["rejects"]["mvbench"] if "video failed to load" in r["reason"]]
    assert [(Path(r["file"]).name, r["line"]) for r in undecodable] == [("object_existence.json", 4)]
    assert results["counts"]["mvbench"] == {"lines": 16, "items": 5, "rejected": 11}
    rows = [json.loads(x) for x in (tmp_path / "answers" / "q" / "mvbench.jsonl").read_text().splitlines()]
    assert [r["parsed"] for r in rows] == ["B", "A", "A", "A", "A"]


def _config(tmp_path: Path, root: Path, model: str) -> Path:
    import yaml

    cfg = {
        "models": [{"name": "tiny", "path": model}],
        "benchmarks": [{"name": "mvbench", "root": str(root), "tasks": TASKS}],
        "out_dir": str(tmp_path / "out"), "batch_size": 2, "max_new_tokens": 3, "seed": 0, "device": "cpu",
        "video_fps": 2.0, "video_max_frames": 4,
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("answer", [None, "(A)"])
def test_vpa_eval_console_script_with_tiny_qwen2_vl(
    tmp_path: Path, mvbench_root: Path, capsys, monkeypatch, answer: str | None
) -> None:
    """The real tiny model answers (gibberish: a random model), or answers "(A)" after really generating from the
    frames (the answers swapped after ``generate``), so the table holds known numbers."""
    pytest.importorskip("torchvision")  # the Qwen2-VL processors need a video processor
    import vpa_lightning.models.generation as generation
    from vpa_lightning.cli import console_main

    generate = generation.greedy_generate
    frames_seen = []

    def spy(model, processor, inputs, max_new_tokens):
        frames_seen.append(int(inputs["video_grid_thw"][:, 0].sum()))  # the clips reached the model's inputs
        out = generate(model, processor, inputs, max_new_tokens)
        return out if answer is None else [answer] * len(out)

    monkeypatch.setattr(generation, "greedy_generate", spy)
    assert console_main(["eval", "--config", str(_config(tmp_path, mvbench_root, "tiny:qwen2_vl"))]) == 0
    assert len(frames_seen) == 3 and all(n > 0 for n in frames_seen)  # batches of 2, 2, 1
    table = capsys.readouterr().out
    for task in TASKS:
        assert f"mvbench/accuracy/{task}" in table
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    m = results["models"]["tiny"]["mvbench"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "answers" / "tiny" / "mvbench.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and m["n"] == 5
    # the metrics are those of the parsed letters in the answers file
    right = {r["item_id"]: float(r["parsed"] == GOOD[r["item_id"]]) for r in rows}
    for task in TASKS:
        mine = [v for k, v in right.items() if k.startswith(task + "/")]
        assert m[f"accuracy/{task}"] == pytest.approx(sum(mine) / len(mine))
    assert m["accuracy"] == pytest.approx(sum(right.values()) / 5)
    assert m["unparsed"] == pytest.approx(sum(r["parsed"] is None for r in rows) / 5)
    if answer is not None:  # "A" is right for action_sequence/2 and object_existence/2 only
        assert [r["parsed"] for r in rows] == ["A"] * 5
        assert (m["accuracy/action_sequence"], m["accuracy/object_existence"], m["accuracy/episodic_reasoning"]) == (
            0.5, 0.5, 0.0)
        assert m["accuracy"] == pytest.approx(2 / 5) and m["unparsed"] == 0.0
        assert "mvbench/accuracy/action_sequence     0.5000" in table


def test_vpa_eval_refuses_a_model_without_video(tmp_path: Path, mvbench_root: Path, capsys) -> None:
    from vpa_lightning.cli import console_main

    status = console_main(["eval", "--config", str(_config(tmp_path, mvbench_root, "tiny:llava"))])
    err = capsys.readouterr().err
    assert status != 0
    assert "--models[0] tiny: benchmark mvbench has videos" in err and "qwen2_vl, qwen2_5_vl" in err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize(("flag", "value"), [("--video_fps", "0"), ("--video_max_frames", "0"),
                                             ("--video_max_pixels", "0")])
def test_video_flags_are_checked(tmp_path: Path, mvbench_root: Path, flag: str, value: str, capsys) -> None:
    from vpa_lightning.cli import console_main

    assert console_main(["eval", "--config", str(_config(tmp_path, mvbench_root, "tiny:qwen2_vl")), flag, value]) == 2
    assert flag in capsys.readouterr().err
