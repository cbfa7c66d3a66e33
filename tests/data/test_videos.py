"""Videos in the data core (issue 25): each published video layout written as a small fixture in
its published form (tiny clips made with PyAV, frame folders of PNG/JPEG frames), built with
``vpa-shard build`` and read back with the stock ``webdataset`` reader, whose members must be
the source files' bytes; bad videos (corrupt, truncated, zero frames, wrong magic, over the limit,
a FIFO) rejected with file, line, field and reason under a hard timeout; the ``datasets``
library's webdataset loader reading a shard with videos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import make_image, rejects, write_jsonl

wds = pytest.importorskip("webdataset")
av = pytest.importorskip("av")
np = pytest.importorskip("numpy")

TIMEOUT = 120  # seconds: a build that hangs on a video fails here instead of hanging CI


def vpa_shard(*args: str) -> subprocess.CompletedProcess:
    """The console script (``vpa-shard``) as a user runs it, under a hard timeout."""
    return subprocess.run([sys.executable, "-m", "vpa_lightning.data.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT)


def make_video(path: Path, fmt: str = "mp4", *, frames: int = 8, size: int = 32, colour=(200, 30, 30)) -> Path:
    """A tiny clip: a square of ``colour`` sliding down over ``frames`` frames of ``size`` x ``size``."""
    codec, container = {"mp4": ("libx264", "mp4"), "mov": ("libx264", "mov"), "mkv": ("libx264", "matroska"),
                        "webm": ("libvpx-vp9", "webm"), "avi": ("mpeg4", "avi")}[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=container) as c:
        s = c.add_stream(codec, rate=4)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for t in range(frames):
            a = np.full((size, size, 3), 235, np.uint8)
            a[2 + t: 10 + t, 8:16] = colour
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def make_noise_video(path: Path, frames: int = 8, size: int = 64) -> Path:
    """A clip of random noise (incompressible: a large file for its length), in Matroska."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="matroska") as c:
        s = c.add_stream("libx264", rate=4)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def make_frames(folder: Path, names: list[str], fmt: str = "PNG") -> dict[str, bytes]:
    """A frame folder: one small image per name (a different colour each); returns name -> bytes."""
    out = {}
    for k, name in enumerate(names):
        out[name] = make_image(folder / name, colour=(20 * k % 256, 100, 255 - 20 * k % 256), size=(8, 8), fmt=fmt).read_bytes()
    return out


def build(out: Path, *args, ok: bool = True) -> subprocess.CompletedProcess:
    proc = vpa_shard("build", *args, "--out", out, "--val-fraction", "0", "--no-plots", "--no-progress")
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def read_back(out: Path) -> list[dict]:
    """Every sample through the stock WebDataset reader: its JSON, images' bytes, videos' members'
    bytes (one list per video, in the JSON's order) and pairs as (chosen text, rejected text)."""
    urls = sorted(str(p) for p in out.glob("train-*.tar"))
    samples = []
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        js = json.loads(s["json"])
        texts = [r["text"] for r in js["responses"]]
        listed = [i["member"] for i in js["images"]] + [m for v in js.get("videos", []) for m in v["members"]]
        assert sorted(listed) == sorted(k for k in s if k not in ("json", "__key__", "__url__", "__local_path__")), s.keys()
        samples.append({
            "json": js,
            "images": [s[i["member"]] for i in js["images"]],
            "videos": [[s[m] for m in v["members"]] for v in js.get("videos", [])],
            "pairs": [(texts[p["chosen"]], texts[p["rejected"]]) for p in js["pairs"]],
        })
    return samples


def build_and_read(out: Path, *args) -> list[dict]:
    build(out, *args)
    return read_back(out)


def by_prompt(samples: list[dict]) -> dict[str, dict]:
    out = {s["json"]["prompt"]: s for s in samples}
    assert len(out) == len(samples)
    return out


def sha256(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


def frames_sha256(frames: list[bytes]) -> str:
    return sha256("\n".join(sha256(f) for f in frames).encode())


def counts(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["counts"]


def test_ms_swift_rows_with_video_files_frame_folders_and_images(tmp_path):
    """ms-swift's RLHF rows as its docs publish them (``messages`` with the user turn and the chosen
    assistant turn, ``rejected_response``, ``videos``, ``images``): every container kind stored as
    it came (``v0.{ext}``), a frame folder as its frames in natural order (``v0.f{j:04}.png``), an
    image and a video in one prompt each at its place, and samples without a video unchanged."""
    clips = {ext: make_video(tmp_path / "clips" / f"c.{ext}", ext).read_bytes() for ext in ("mp4", "mov", "webm", "mkv", "avi")}
    frames = make_frames(tmp_path / "clips" / "clip_00001", ["frame_10.png", "frame_2.png", "frame_1.png"])
    (tmp_path / "clips" / "clip_00001" / "README.txt").write_text("not a frame")  # other files are not frames
    still = make_image(tmp_path / "still.jpg", fmt="JPEG").read_bytes()

    def row(question, videos=None, images=None):
        r = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "Left."}], "rejected_response": "Right."}
        if videos is not None:
            r["videos"] = videos
        if images is not None:
            r["images"] = images
        return r

    rows = [row(f"<video>Which way does it move ({ext})?", [f"clips/c.{ext}"]) for ext in clips]
    rows += [
        row("<video>Which way does the square move?", ["clips/clip_00001"]),
        row("Is <image> the first frame of <video>?", ["clips/c.mp4"], ["still.jpg"]),
        row("<image>What colour is the block?", images=["still.jpg"]),
    ]
    out = tmp_path / "out"
    build(out, write_jsonl(tmp_path / "swift.jsonl", rows))
    got = by_prompt(read_back(out))
    for ext, data in clips.items():
        s = got[f"Which way does it move ({ext})?"]
        assert s["pairs"] == [("Left.", "Right.")]
        assert s["videos"] == [[data]]  # the file's bytes as they came
        assert s["json"]["videos"] == [{"kind": "file", "members": [f"v0.{ext}"], "sha256": sha256(data), "offset": 0}]
        assert s["images"] == [] and s["json"]["image_sha256"] is None
    s = got["Which way does the square move?"]
    in_order = [frames["frame_1.png"], frames["frame_2.png"], frames["frame_10.png"]]
    assert s["videos"] == [in_order]
    assert s["json"]["videos"] == [{"kind": "frames", "members": ["v0.f0000.png", "v0.f0001.png", "v0.f0002.png"],
                                    "sha256": frames_sha256(in_order), "offset": 0}]
    s = got["Is  the first frame of ?"]
    assert (s["images"], s["videos"]) == ([still], [[clips["mp4"]]])
    assert (s["json"]["images"][0]["offset"], s["json"]["videos"][0]["offset"]) == (3, 23)
    s = got["What colour is the block?"]
    assert "videos" not in s["json"]  # a sample without videos keeps the JSON it always had
    assert list(s["json"]) == ["key", "prompt", "image_sha256", "images", "responses", "pairs", "source"]
    c = counts(out)
    assert (c["records_in"], c["records_used"], c["videos"]) == (8, 8, 7)
    assert c["video_bytes"] == sum(len(b) for b in clips.values()) + len(clips["mp4"]) + sum(len(f) for f in in_order)
    proc = vpa_shard("inspect", out)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_a_sample_with_an_image_and_a_video_keeps_both_offsets(tmp_path):
    """The stored prompt has both placeholders removed; each entry's ``offset`` says where its
    ``<image>`` / ``<video>`` stood, so the prompt cut there interleaves text, image and video."""
    clip = make_video(tmp_path / "v.mp4").read_bytes()
    img = make_image(tmp_path / "i.png").read_bytes()
    rows = [{"messages": [{"role": "user", "content": "Before: <image>\nAfter: <video>\nWhat changed?"},
                          {"role": "assistant", "content": "The square moved down."}],
             "rejected_response": "Nothing.", "images": ["i.png"], "videos": ["v.mp4"]}]
    (s,) = build_and_read(tmp_path / "out", write_jsonl(tmp_path / "rows.jsonl", rows))
    prompt, js = s["json"]["prompt"], s["json"]
    assert prompt == "Before: \nAfter: \nWhat changed?"
    i_at, v_at = js["images"][0]["offset"], js["videos"][0]["offset"]
    assert (i_at, v_at) == (len("Before: "), len("Before: \nAfter: "))
    parts = [prompt[:i_at], s["images"][0], prompt[i_at:v_at], s["videos"][0][0], prompt[v_at:]]
    assert parts == ["Before: ", img, "\nAfter: ", clip, "\nWhat changed?"]


def test_llama_factory_sharegpt_preference_rows_with_videos(tmp_path):
    """LLaMA-Factory's sharegpt preference data (``ranking: true``): a JSON list of
    ``{"conversations": [human turn], "chosen": gpt turn, "rejected": gpt turn, "videos": [...]}``
    (``images`` beside them too); ``<video>`` / ``<image>`` where they stand."""
    a = make_video(tmp_path / "data" / "mllm_demo_data" / "1.mp4").read_bytes()
    b = make_video(tmp_path / "data" / "mllm_demo_data" / "2.avi", "avi", colour=(30, 30, 200)).read_bytes()
    img = make_image(tmp_path / "data" / "mllm_demo_data" / "1.jpg", fmt="JPEG").read_bytes()
    rows = [
        {"conversations": [{"from": "human", "value": "<video>Why is this video funny?"}],
         "chosen": {"from": "gpt", "value": "Because a baby is wearing glasses."},
         "rejected": {"from": "gpt", "value": "It is a sad video."}, "videos": ["mllm_demo_data/1.mp4"]},
        {"conversations": [{"from": "human", "value": "Does <image> come from <video>?"}],
         "chosen": {"from": "gpt", "value": "No."}, "rejected": {"from": "gpt", "value": "Yes."},
         "images": ["mllm_demo_data/1.jpg"], "videos": ["mllm_demo_data/2.avi"]},
    ]
    f = tmp_path / "data" / "video_dpo.json"
    f.write_text(json.dumps(rows, indent=2))
    got = by_prompt(build_and_read(tmp_path / "out", f))
    s = got["Why is this video funny?"]
    assert s["pairs"] == [("Because a baby is wearing glasses.", "It is a sad video.")]
    assert s["videos"] == [[a]] and s["json"]["videos"][0]["members"] == ["v0.mp4"]
    s = got["Does  come from ?"]
    assert (s["images"], s["videos"]) == ([img], [[b]])
    assert (s["json"]["images"][0]["offset"], s["json"]["videos"][0]["offset"]) == (5, 16)
    assert s["json"]["videos"][0]["members"] == ["v0.avi"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["files"][0]["layout"] == "pairwise"


def test_llava_hound_sft_dpo_rows_with_frame_folders(tmp_path):
    """ShareGPT-Video / LLaVA-Hound's ``sft_dpo_17k.jsonl``: ``{"id", "prompt", "answer", "chosen",
    "rejected", "chosen_score", "rejected_score", "video"}``, ``video`` a frame folder under the
    frames root (``--image-root``)."""
    root = tmp_path / "train_300k"
    f1 = make_frames(root / "v_k3TQpJvQ0Mo", [f"c{j:02d}.jpg" for j in range(1, 9)], fmt="JPEG")
    f2 = make_frames(root / "webvid" / "1034511551", [f"c{j:02d}.jpg" for j in range(1, 5)], fmt="JPEG")
    rows = [
        {"id": "v_k3TQpJvQ0Mo_0", "prompt": "<video>\nWhat is the person in the video doing?", "answer": "Slicing bread.",
         "chosen": "The person is slicing a loaf of bread on a wooden board.", "rejected": "The person is playing the piano.",
         "chosen_score": 5.0, "rejected_score": 1.0, "video": "v_k3TQpJvQ0Mo"},
        {"id": "1034511551_1", "prompt": "What colour is the sky?", "answer": "Blue.", "chosen": "It is blue.",
         "rejected": "It is green.", "chosen_score": 4.0, "rejected_score": 2.0, "video": "webvid/1034511551"},
    ]
    ann = write_jsonl(tmp_path / "video_instruction" / "train" / "dpo" / "sft_dpo_17k.jsonl", rows)
    got = by_prompt(build_and_read(tmp_path / "out", ann, "--image-root", root))
    s = got["What is the person in the video doing?"]
    assert s["pairs"] == [("The person is slicing a loaf of bread on a wooden board.", "The person is playing the piano.")]
    assert s["videos"] == [list(f1.values())]
    assert s["json"]["videos"][0]["members"] == [f"v0.f{j:04d}.jpg" for j in range(8)]
    assert s["json"]["videos"][0]["sha256"] == frames_sha256(list(f1.values()))
    assert got["What colour is the sky?"]["videos"] == [list(f2.values())]


def test_mm_rlhf_dpo_pairs_with_video_frame_folders_beside_image_rows(tmp_path):
    """MM-RLHF's ``dpo_pairs.jsonl``: video rows name a frame folder (``long/...``, ``short/...``)
    in ``video``, image rows an image in ``image``; ``prompt``, ``chosen``, ``rejected`` and the
    annotators' reasons. Paths are relative to the dataset folder (the file's own)."""
    mm = tmp_path / "MM-RLHF"
    frames = make_frames(mm / "long" / "video_0001", [f"frame_{j}.jpg" for j in (1, 2, 3, 10, 11)], fmt="JPEG")
    img = make_image(mm / "mcq" / "0001.jpg", fmt="JPEG").read_bytes()
    rows = [
        {"video": "long/video_0001", "prompt": "What happens after the man sits down?", "chosen": "He opens a book.",
         "rejected": "He leaves the room.", "chosen_reason": "Matches the frames.", "rejected_reason": "He stays.",
         "chosen_score": 3, "rejected_score": 1},
        {"image": "mcq/0001.jpg", "prompt": "<image>\nWhat is in the picture?", "chosen": "A red block.", "rejected": "A ball.",
         "chosen_reason": "Right.", "rejected_reason": "Wrong."},
    ]
    got = by_prompt(build_and_read(tmp_path / "out", write_jsonl(mm / "dpo_pairs.jsonl", rows)))
    s = got["What happens after the man sits down?"]
    assert s["pairs"] == [("He opens a book.", "He leaves the room.")]
    assert s["videos"] == [[frames[f"frame_{j}.jpg"] for j in (1, 2, 3, 10, 11)]]  # natural order
    assert s["images"] == []
    t = got["What is in the picture?"]
    assert t["images"] == [img] and "videos" not in t["json"]


def test_declared_video_field_in_the_mapped_layout(tmp_path):
    """Any other layout: ``--field video=PATH`` (dotted), a file or a frame folder."""
    clip = make_video(tmp_path / "media" / "7.webm", "webm").read_bytes()
    rows = [{"ask": "What falls <video> first?", "good": "The cup.", "bad": "The plate.", "media": {"clip": "media/7.webm"}}]
    f = write_jsonl(tmp_path / "custom.jsonl", rows)
    (s,) = build_and_read(tmp_path / "out", f, "--field", "prompt=ask", "--field", "chosen=good", "--field", "rejected=bad",
                          "--field", "video=media.clip")
    assert (s["json"]["prompt"], s["videos"], s["json"]["videos"][0]["offset"]) == ("What falls  first?", [[clip]], 11)


def test_parquet_rows_with_embedded_video_bytes(tmp_path):
    """A Parquet file whose ``video`` column is the ``datasets`` ``Video()`` struct ``{bytes, path}``:
    the embedded bytes are checked and stored as they are, the type from the bytes (an AVI named .mp4)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    clip = make_video(tmp_path / "src" / "c.avi", "avi").read_bytes()
    video_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"video": pa.array([{"bytes": clip, "path": "c.mp4"}, {"bytes": clip[:200], "path": "cut.mp4"}], type=video_t),
                      "prompt": ["Which way does it move?", "Is it cut?"], "chosen": ["Down.", "Yes."], "rejected": ["Up.", "No."]})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    (s,) = build_and_read(tmp_path / "out", tmp_path / "data")
    assert s["videos"] == [[clip]] and s["json"]["videos"][0]["members"] == ["v0.avi"]
    (bad,) = rejects(tmp_path / "out")
    assert (bad["line"], bad["field"]) == (2, "video") and "truncated" in bad["reason"], bad


def test_dedup_and_the_split_key_include_the_videos(tmp_path):
    """Two records with the same prompt on different videos are two groups; on the same video
    (bytes, whatever the path) one group with both sources. The split keeps a video on one side."""
    make_video(tmp_path / "a.mp4")
    make_video(tmp_path / "b.mp4", colour=(30, 200, 30))
    (tmp_path / "a_copy.mp4").write_bytes((tmp_path / "a.mp4").read_bytes())
    row = lambda v, r: {"video": v, "prompt": "Which way?", "chosen": "Down.", "rejected": r}  # noqa: E731
    out = tmp_path / "out"
    samples = build_and_read(out, write_jsonl(tmp_path / "rows.jsonl", [row("a.mp4", "Up."), row("b.mp4", "Up."), row("a_copy.mp4", "Left.")]))
    assert len(samples) == 2
    merged = [s for s in samples if len(s["json"]["source"]) == 2]
    assert len(merged) == 1 and sorted(merged[0]["pairs"]) == [("Down.", "Left."), ("Down.", "Up.")]
    c = counts(out)
    assert (c["records_in"], c["records_used"], c["records_deduplicated"], c["records_rejected"]) == (3, 2, 1, 0)


def test_bad_videos_are_rejected_with_file_line_field_and_reason(tmp_path):
    """Corrupt, truncated, zero-frame, wrong-magic, over-limit, missing and FIFO videos: each record
    rejected with its file, line, field and reason (never built text-only, never dropped
    silently), the good record beside them built, the counts adding up; under a hard timeout."""
    good = make_video(tmp_path / "good.mp4").read_bytes()
    mp4 = good
    (tmp_path / "cut.mp4").write_bytes(mp4[: len(mp4) // 2])
    corrupt = bytearray(mp4)
    second = int.from_bytes(mp4[:4], "big")  # the box after ftyp: its type overwritten with garbage
    corrupt[second + 4: second + 8] = b"\x00\x01\x02\x03"
    (tmp_path / "corrupt.mp4").write_bytes(bytes(corrupt))
    webm = make_video(tmp_path / "w.webm", "webm").read_bytes()
    (tmp_path / "cut.webm").write_bytes(webm[: len(webm) - 40])
    avi = make_video(tmp_path / "a.avi", "avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(avi[:-100])
    (tmp_path / "image.mp4").write_bytes(make_image(tmp_path / "x.png").read_bytes())  # a PNG named .mp4
    (tmp_path / "no_frames").mkdir()
    (tmp_path / "no_frames" / "info.txt").write_text("frames were never extracted")
    make_noise_video(tmp_path / "big.mkv")
    bad_frame = tmp_path / "bad_frames"
    make_frames(bad_frame, ["1.png", "2.png"])
    (bad_frame / "2.png").write_bytes((bad_frame / "2.png").read_bytes()[:30])
    os.mkfifo(tmp_path / "pipe.mp4")
    row = lambda v: {"messages": [{"role": "user", "content": "<video>Which way?"}, {"role": "assistant", "content": "Down."}],  # noqa: E731
                     "rejected_response": "Up.", "videos": [v]}
    cases = [
        ("good.mp4", None),
        ("cut.mp4", "truncated"),
        ("corrupt.mp4", "corrupt"),
        ("cut.webm", "truncated"),
        ("cut.avi", "truncated"),
        ("image.mp4", "not a recognised video container"),
        ("no_frames", "holds no frame images"),
        ("big.mkv", "over the limit of {limit} (--max-video-bytes)"),
        ("bad_frames", "frame 1 of"),
        ("pipe.mp4", "not a regular file (a FIFO)"),
        ("missing.mp4", "missing or unreadable"),
    ]
    limit = max(len(good), len(webm), len(avi)) + 1
    assert (tmp_path / "big.mkv").stat().st_size > limit
    out = tmp_path / "out"
    build(out, write_jsonl(tmp_path / "rows.jsonl", [row(v) for v, _ in cases]), "--max-video-bytes", str(limit))
    (s,) = read_back(out)
    assert s["videos"] == [[good]]
    got = {r["line"]: r for r in rejects(out)}
    assert sorted(got) == list(range(2, len(cases) + 1))
    for line, (video, why) in enumerate(cases, 1):
        if why is None:
            continue
        r = got[line]
        assert (r["file"], r["field"], r["kind"]) == (str(tmp_path / "rows.jsonl"), "videos[0]", "record"), r
        assert why.format(limit=limit) in r["reason"] and video in r["reason"], (video, r["reason"])
    c = counts(out)
    assert c["records_in"] == c["records_used"] + c["records_deduplicated"] + c["records_rejected"] == len(cases)
    assert c["records_rejected"] == len(cases) - 1


def test_frame_size_from_the_container_headers_is_held_to_the_pixel_limit(tmp_path):
    """A video file's frame size is read from its headers (mp4/mov sample description, Matroska/WebM
    PixelWidth/Height, AVI main header), never by decoding, and held to ``--max-image-pixels`` like an
    image: one pixel over the limit rejects each container with its size, the limit itself builds them.
    An audio-only MP4 is rejected as having no video track."""
    files = []
    for name, container, codec in [("a.mp4", "mp4", "libx264"), ("a.mov", "mov", "libx264"), ("a.mkv", "matroska", "libx264"),
                                   ("a.webm", "webm", "libvpx-vp9"), ("a.avi", "avi", "mpeg4")]:
        with av.open(str(tmp_path / name), "w", format=container) as c:
            s = c.add_stream(codec, rate=4)
            s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"  # not square: width and height must not swap
            for t in range(3):
                for pk in s.encode(av.VideoFrame.from_ndarray(np.full((32, 48, 3), 40 * t, np.uint8), format="rgb24")):
                    c.mux(pk)
            for pk in s.encode():
                c.mux(pk)
        files.append(name)
    with av.open(str(tmp_path / "audio.mp4"), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for pk in [*s.encode(frame), *s.encode()]:
            c.mux(pk)
    row = lambda v: {"messages": [{"role": "user", "content": f"<video>What is in {v}?"}, {"role": "assistant", "content": "A."}],  # noqa: E731
                     "rejected_response": "B.", "videos": [v]}
    rows = write_jsonl(tmp_path / "rows.jsonl", [row(v) for v in [*files, "audio.mp4"]])
    over = build(tmp_path / "over", rows, "--image-root", tmp_path, "--max-image-pixels", "1535", ok=False)
    assert over.returncode != 0  # nothing was built: a run that did nothing fails
    got = {r["line"]: r for r in rejects(tmp_path / "over")}
    assert sorted(got) == list(range(1, len(files) + 2))
    for line, name in enumerate(files, 1):
        assert got[line]["field"] == "videos[0]"
        assert f"{name} has 48x32 = 1536 pixels per frame, over the limit of 1535 (--max-image-pixels)" in got[line]["reason"]
    assert "no video track" in got[len(files) + 1]["reason"]
    build(tmp_path / "at", rows, "--image-root", tmp_path, "--max-image-pixels", "1536")
    assert [r["line"] for r in rejects(tmp_path / "at")] == [len(files) + 1]
    assert counts(tmp_path / "at")["videos"] == len(files)


def test_the_guard_flag_is_checked(tmp_path):
    f = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    proc = build(tmp_path / "out", f, "--max-video-bytes", "0", ok=False)
    assert proc.returncode == 2 and "--max-video-bytes" in proc.stderr, proc.stdout + proc.stderr


def test_the_datasets_webdataset_loader_reads_a_shard_with_videos(tmp_path):
    """``datasets.load_dataset("webdataset", ...)`` groups a sample's members (``v0.mp4`` is a Video
    feature, ``v0.f0000.png`` frames are Images, ``json`` the sample) and gives the bytes back."""
    datasets = pytest.importorskip("datasets")
    clips = [make_video(tmp_path / f"c{i}.mp4", colour=(40 * i, 90, 90)).read_bytes() for i in range(3)]
    rows = [{"messages": [{"role": "user", "content": f"<video>Question {i}?"}, {"role": "assistant", "content": "Yes."}],
             "rejected_response": "No.", "videos": [f"c{i}.mp4"]} for i in range(3)]
    out = tmp_path / "out"
    build(out, write_jsonl(tmp_path / "rows.jsonl", rows))
    ds = datasets.load_dataset("webdataset", data_files={"train": sorted(str(p) for p in out.glob("train-*.tar"))}, split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["v0.mp4"], datasets.Video)
    ds = ds.cast_column("v0.mp4", datasets.Video(decode=False))  # bytes, without a video decoder installed
    got = {r["json"]["prompt"]: (r["v0.mp4"]["bytes"], r["json"]["videos"]) for r in ds}
    assert sorted(got) == ["Question 0?", "Question 1?", "Question 2?"]
    for i, clip in enumerate(clips):
        data, videos = got[f"Question {i}?"]
        assert data == clip and videos == [{"kind": "file", "members": ["v0.mp4"], "sha256": sha256(clip), "offset": 0}]

    frames = {i: make_frames(tmp_path / f"f{i}", ["1.png", "2.png"]) for i in range(2)}
    rows = [{"video": f"f{i}", "prompt": f"Frames {i}?", "chosen": "Yes.", "rejected": "No."} for i in range(2)]
    out2 = tmp_path / "out2"
    build(out2, write_jsonl(tmp_path / "frames.jsonl", rows))
    ds = datasets.load_dataset("webdataset", data_files={"train": sorted(str(p) for p in out2.glob("train-*.tar"))}, split="train",
                               cache_dir=str(tmp_path / "cache2"))
    assert isinstance(ds.features["v0.f0000.png"], datasets.Image)
    ds = ds.cast_column("v0.f0000.png", datasets.Image(decode=False)).cast_column("v0.f0001.png", datasets.Image(decode=False))
    for r in ds:
        i = int(r["json"]["prompt"].split()[1][0])
        assert [r["v0.f0000.png"]["bytes"], r["v0.f0001.png"]["bytes"]] == [frames[i]["1.png"], frames[i]["2.png"]]
