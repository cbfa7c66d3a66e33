"""Published layouts, each in its exact published form, built through ``vpa-shard build`` and read
back with the stock ``webdataset`` reader: exact (chosen, rejected) texts and image bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import make_image, rejects, write_jsonl

wds = pytest.importorskip("webdataset")


def vpa_shard(*args: str) -> subprocess.CompletedProcess:
    """The console script (``vpa-shard``) as a user runs it."""
    return subprocess.run([sys.executable, "-m", "vpa_lightning.data.cli", *args], capture_output=True, text=True)


def build_and_read(out: Path, *args: str) -> list[dict]:
    """Build, then read every sample with the stock WebDataset reader: one dict per sample with
    its JSON, its images' bytes in order, and its pairs as (chosen text, rejected text)."""
    proc = vpa_shard("build", *map(str, args), "--out", str(out), "--val-fraction", "0", "--no-plots", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    urls = sorted(str(p) for p in out.glob("train-*.tar"))
    out_samples = []
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        js = json.loads(s["json"])
        texts = [r["text"] for r in js["responses"]]
        out_samples.append({
            "json": js,
            "images": [s[i["member"]] for i in js["images"]],
            "pairs": [(texts[p["chosen"]], texts[p["rejected"]]) for p in js["pairs"]],
        })
    return out_samples


def write_json(path: Path, rows: list) -> Path:
    """A JSON array, as ``json.dump(rows, f)`` writes it (SeVa, MM-DPO, POVID, LLaVA-RLHF)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def one(samples: list[dict]) -> dict:
    assert len(samples) == 1, samples
    return samples[0]


def test_trl_vision_rows(tmp_path):
    """TRL's vision preference format (HuggingFaceH4/rlaif-v_formatted): ``images`` + messages."""
    img = make_image(tmp_path / "i.png")
    rows = [{"images": ["i.png"],
             "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who wrote this?"}]}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Jane Austen."}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Charles Dickens."}]}]}]
    s = one(build_and_read(tmp_path / "out", write_jsonl(tmp_path / "train.jsonl", rows)))
    assert s["pairs"] == [("Jane Austen.", "Charles Dickens.")]
    assert s["images"] == [img.read_bytes()]
    assert s["json"]["prompt"] == "Who wrote this?"


def test_rlaif_v_and_rlhf_v_rows(tmp_path):
    """RLAIF-V / SPA-VL columns (``question``/``chosen``/``rejected``) and RLHF-V's ``text`` JSON string.
    (Their hub files are Parquet; here the same fields as JSON rows.)"""
    a = make_image(tmp_path / "a.jpg", fmt="JPEG")
    make_image(tmp_path / "b.jpg", colour=(1, 200, 1), fmt="JPEG")
    rows = [
        {"ds_name": "RLAIF-V", "image": "a.jpg", "question": "What is in the image?", "chosen": "A red block.",
         "rejected": "A red block and a ball.", "origin_dataset": "VQAv2", "origin_split": "train", "idx": 0, "image_path": "a.jpg"},
    ]
    s = one(build_and_read(tmp_path / "o1", write_jsonl(tmp_path / "rlaif.jsonl", rows)))
    assert s["pairs"] == [("A red block.", "A red block and a ball.")]
    assert s["images"] == [a.read_bytes()]
    rhv = [{"ds_name": "RLHF-V", "image": "b.jpg",
            "text": json.dumps({"question": "Describe it.", "chosen": "A green square.", "rejected": "A green circle."}),
            "origin_dataset": "coco", "origin_split": "train", "idx": 3, "image_path": "b.jpg"}]
    s = one(build_and_read(tmp_path / "o2", write_jsonl(tmp_path / "rlhfv.jsonl", rhv)))
    assert s["pairs"] == [("A green square.", "A green circle.")]


def test_vlfeedback_raw_rows_find_merged_images(tmp_path):
    """VLFeedback as released: no ``img_path``; the image is ``merged_images/{id}.jpg``."""
    img = make_image(tmp_path / "merged_images" / "svit-conversation-3700.jpg", fmt="JPEG")
    ann = lambda r: {a: {"Rating": str(r), "Rationale": "."} for a in ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")}  # noqa: E731
    rows = [{"id": "svit-conversation-3700", "prompt": "What are the colors of the bus?", "models": ["a", "b"],
             "completions": [{"model": "a", "response": "Red and white.", "annotations": ann(5)},
                             {"model": "b", "response": "Blue.", "annotations": ann(2)}]}]
    s = one(build_and_read(tmp_path / "out", write_jsonl(tmp_path / "vlfeedback_80k.jsonl", rows)))
    assert s["pairs"] == [("Red and white.", "Blue.")]
    assert s["images"] == [img.read_bytes()]


def test_declared_fields_and_image_template(tmp_path):
    """Any other layout: ``--field`` (dotted paths) and ``--image-template``."""
    img = make_image(tmp_path / "pics" / "q-17.png")
    rows = [{"meta": {"uid": 17}, "ask": {"text": "<image>\nHow many?"}, "answers": {"good": "Three.", "bad": "Five."}}]
    f = write_jsonl(tmp_path / "custom.jsonl", rows)
    s = one(build_and_read(tmp_path / "out", f, "--field", "prompt=ask.text", "--field", "chosen=answers.good",
                           "--field", "rejected=answers.bad", "--image-template", "pics/q-{meta.uid}.png"))
    assert s["pairs"] == [("Three.", "Five.")]
    assert s["images"] == [img.read_bytes()]
    assert s["json"]["prompt"] == "How many?"
    proc = vpa_shard("build", str(f), "--out", str(tmp_path / "bad"), "--field", "prompt=ask.text", "--field", "chosen=answers.good")
    assert proc.returncode == 2 and "--field rejected=PATH is required" in proc.stderr


def test_text_only_and_multi_image_rows(tmp_path):
    """UltraFeedback-style text rows (no image) and rows with several images are valid samples."""
    a = make_image(tmp_path / "a.png")
    b = make_image(tmp_path / "b.png", colour=(0, 0, 255))
    rows = [{"prompt": "Write a haiku about rain.", "chosen": "Soft rain on the roof.", "rejected": "Rain."},
            {"images": ["a.png", "b.png"], "question": "<image><image>\nWhich is bluer?", "chosen": "The second.", "rejected": "The first."}]
    samples = build_and_read(tmp_path / "out", write_jsonl(tmp_path / "mixed.jsonl", rows))
    by_prompt = {s["json"]["prompt"]: s for s in samples}
    assert by_prompt["Write a haiku about rain."]["images"] == []
    assert by_prompt["Write a haiku about rain."]["pairs"] == [("Soft rain on the roof.", "Rain.")]
    assert by_prompt["Which is bluer?"]["images"] == [a.read_bytes(), b.read_bytes()]


def _interleaved(sample: dict) -> list:
    """The prompt cut at its images' offsets: text and image parts in order, as the trainer builds them."""
    prompt, parts, at = sample["json"]["prompt"], [], 0
    for image, entry in zip(sample["images"], sample["json"]["images"]):
        parts += [prompt[at : entry["offset"]], image]
        at = entry["offset"]
    return [p for p in [*parts, prompt[at:]] if p != ""]


def test_image_offsets_say_where_each_image_sits(tmp_path):
    """Each image entry's ``offset`` (chars of the stored prompt before it) keeps where the
    ``<image>`` placeholder or TRL image block stood: interleaved TRL blocks, a placeholder in
    the middle of a JSONL prompt, none at all (LLaVA's convention: images first), and a count that
    does not match the images (rejected, naming the field)."""
    a = make_image(tmp_path / "a.png").read_bytes()
    b = make_image(tmp_path / "b.png", colour=(0, 0, 255)).read_bytes()
    answer = {"chosen": [{"role": "assistant", "content": "The first."}], "rejected": [{"role": "assistant", "content": "The second."}]}
    trl = [{"images": ["a.png", "b.png"], **answer, "prompt": [{"role": "user", "content": [
        {"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " with "}, {"type": "image"},
        {"type": "text", "text": ": which is older?"}]}]}]
    s = one(build_and_read(tmp_path / "o1", write_jsonl(tmp_path / "trl.jsonl", trl)))
    assert s["json"]["prompt"] == "Compare  with : which is older?"
    assert [i["offset"] for i in s["json"]["images"]] == [8, 14]
    assert _interleaved(s) == ["Compare ", a, " with ", b, ": which is older?"]

    rows = [{"images": ["a.png", "b.png"], "question": "Is the cat in <image> also in <image>?", "chosen": "Yes.", "rejected": "No."},
            {"image": "b.png", "question": "Wie heißt das?\n<image>", "chosen": "Blau.", "rejected": "Rot."},
            {"image": "a.png", "question": "What colour is it?", "chosen": "Red.", "rejected": "Blue."},
            {"image": "a.png", "question": "<image> and <image>?", "chosen": "x", "rejected": "y"}]
    out = tmp_path / "o2"
    by_prompt = {s["json"]["prompt"]: s for s in build_and_read(out, write_jsonl(tmp_path / "rows.jsonl", rows))}
    assert _interleaved(by_prompt["Is the cat in  also in ?"]) == ["Is the cat in ", a, " also in ", b, "?"]
    assert by_prompt["Wie heißt das?"]["json"]["images"][0]["offset"] == len("Wie heißt das?")  # chars, not bytes
    assert _interleaved(by_prompt["Wie heißt das?"]) == ["Wie heißt das?", b]
    assert by_prompt["What colour is it?"]["json"]["images"][0]["offset"] == 0
    assert _interleaved(by_prompt["What colour is it?"]) == [a, "What colour is it?"]
    (bad,) = rejects(out)
    assert (bad["line"], bad["field"]) == (4, "question")
    assert "2 <image> placeholders in the prompt but 1 image" in bad["reason"]


def test_mmpr_multi_image_markers_are_placed(tmp_path):
    """InternVL/MMPR multi-image rows (``Image-1: <image>\nImage-2: <image>\n...`` with an image
    list) through ``meta.json``: each image's offset is where its marker stood."""
    root = tmp_path / "MMPR" / "images"
    a = make_image(root / "a.png").read_bytes()
    b = make_image(root / "b.png", colour=(0, 0, 255)).read_bytes()
    write_jsonl(tmp_path / "MMPR" / "ann.jsonl", [{"image": ["a.png", "b.png"], "question": "Image-1: <image>\nImage-2: <image>\nWhich is blue?",
                                                 "chosen": "Image-2.", "rejected": "Image-1."}])
    (tmp_path / "MMPR" / "meta.json").write_text(json.dumps({"s": {"root": "MMPR/images", "annotation": "MMPR/ann.jsonl", "repeat_time": 1, "length": 1}}))
    s = one(build_and_read(tmp_path / "out", tmp_path / "MMPR" / "meta.json"))
    assert _interleaved(s) == ["Image-1: ", a, "\nImage-2: ", b, "\nWhich is blue?"]


def test_merged_records_keep_the_first_records_image_offsets(tmp_path):
    """The dedup key ignores where images sit (placeholders removed), so records that differ only
    in that merge; the group keeps the first record's prompt and offsets."""
    make_image(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "What is it?\n<image>", "chosen": "A red block.", "rejected": "A ball."},
            {"image": "a.png", "question": "<image>\nWhat is it?", "chosen": "A red block.", "rejected": "A cup."}]
    s = one(build_and_read(tmp_path / "out", write_jsonl(tmp_path / "rows.jsonl", rows)))
    assert len(s["json"]["source"]) == 2
    assert (s["json"]["prompt"], s["json"]["images"][0]["offset"]) == ("What is it?", len("What is it?"))


def test_forced_format_and_detection(tmp_path):
    make_image(tmp_path / "a.jpg", fmt="JPEG")
    q = {"from": "human", "value": "<image>\nQ"}
    rows = [{"image": "a.jpg", "conversations": [q, {"from": "gpt", "value": "yes"}],
             "rejected_conversations": [q, {"from": "gpt", "value": "no"}]}]
    f = write_jsonl(tmp_path / "povid.jsonl", rows)
    assert one(build_and_read(tmp_path / "o1", f, "--format", "povid"))["pairs"] == [("yes", "no")]
    # Forced to another layout: the record is rejected with the field it lacks named, and a build
    # that used nothing fails.
    proc = vpa_shard("build", str(f), "--out", str(tmp_path / "o2"), "--format", "llava-rlhf", "--no-plots")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert rejects(tmp_path / "o2")[0]["field"] == "output_1"



def test_seva_dpo_file(tmp_path):
    """SeVa step 3 (make_pair_*.py): ``json.dump`` of ``{chosen, reject, question, image_id}``; the
    image is ``image_id`` under the image folder."""
    img = make_image(tmp_path / "ocr_vqa" / "images" / "71.jpg", fmt="JPEG")
    rows = [{"chosen": "The title is Cooking Light.", "reject": "The title is Cooking.",
             "question": "What is the title of this book?\nAnswer the question using a single word or phrase.",
             "image_id": "71.jpg"}]
    f = write_json(tmp_path / "merged_answer_file_8k_diffusion_step500.json", rows)
    s = one(build_and_read(tmp_path / "out", f, "--image-root", tmp_path / "ocr_vqa" / "images"))
    assert s["pairs"] == [("The title is Cooking Light.", "The title is Cooking.")]
    assert s["images"] == [img.read_bytes()]
    assert s["json"]["prompt"] == rows[0]["question"]


def test_mmdpo_dpo_file_with_python_literal_turns_and_ref_logps(tmp_path):
    """MM-DPO (``encode_multimodal_preference_sample``): ``question``/``chosen``/``rejected`` as
    ``{"from", "value"}`` turns or their Python ``str()`` (after a CSV round trip), image file
    name, and the reference log-probs the notebooks computed."""
    make_image(tmp_path / "coco" / "a.jpg", fmt="JPEG")
    b = make_image(tmp_path / "coco" / "b.jpg", colour=(0, 90, 0), fmt="JPEG")
    rows = [
        {"question": {"from": "human", "value": "<image>\nWhat is on the plate?"},
         "chosen": {"from": "gpt", "value": "Two slices of pizza."}, "rejected": {"from": "gpt", "value": "A cake."},
         "image": "a.jpg", "ref_win_logp": -12.5, "ref_rej_logp": -30.25, "ref_win_avg_logp": -1.25,
         "ref_rej_avg_logp": -3.0, "ref_win_per_token_logp": [-1.0, -1.5], "ref_rej_per_token_logp": [-3.0]},
        {"question": "{'from': 'human', 'value': \"<image>\\nWhat's the colour?\"}",
         "chosen": "{'from': 'gpt', 'value': 'Green, like \"grass\".'}", "rejected": "{'from': 'gpt', 'value': 'Red.'}",
         "image": "b.jpg"},
        # The HelpSteer part has no image (text-only, MM-DPO's language-skill data).
        {"question": {"from": "human", "value": "Name a prime."}, "chosen": {"from": "gpt", "value": "7"},
         "rejected": {"from": "gpt", "value": "8"}, "ref_win_logp": -2.0, "ref_rej_logp": -9.0},
    ]
    f = write_json(tmp_path / "dpo_logp.json", rows)
    samples = build_and_read(tmp_path / "out", f, "--image-root", tmp_path / "coco", "--ref-logp-model", "llava-v1.5-13b")
    by_prompt = {s["json"]["prompt"]: s for s in samples}
    assert by_prompt["What is on the plate?"]["pairs"] == [("Two slices of pizza.", "A cake.")]
    g = by_prompt["What's the colour?"]
    assert g["pairs"] == [('Green, like "grass".', "Red.")]
    assert g["images"] == [b.read_bytes()]
    assert "ref_logps" not in g["json"]["pairs"][0]
    t = by_prompt["Name a prime."]
    assert (t["pairs"], t["images"]) == ([("7", "8")], [])
    assert t["json"]["pairs"][0]["ref_logps"]["chosen"] == -2.0
    lp = by_prompt["What is on the plate?"]["json"]["pairs"][0]["ref_logps"]
    assert lp == {"chosen": -12.5, "rejected": -30.25, "chosen_avg": -1.25, "rejected_avg": -3.0,
                  "fields": "ref_win_logp, ref_rej_logp", "model": "llava-v1.5-13b",
                  "source": {"file": str(f), "line": 1, "index": 0}}


def test_mmdpo_never_executes_a_data_file(tmp_path):
    marker = tmp_path / "pwned"
    make_image(tmp_path / "a.jpg", fmt="JPEG")
    rows = [{"question": f"{{'from': 'human', 'value': __import__('os').system('touch {marker}')}}",
             "chosen": "{'from': 'gpt', 'value': 'x'}", "rejected": "{'from': 'gpt', 'value': 'y'}", "image": "a.jpg"},
            {"question": "{'from': 'human', 'value': 'Q'}", "chosen": "{'from': 'gpt', 'value': 'x'}",
             "rejected": "{'from': 'gpt', 'value': 'y'}", "image": "a.jpg"}]
    f = write_json(tmp_path / "dpo.json", rows)
    assert len(build_and_read(tmp_path / "out", f)) == 1
    assert not marker.exists()
    (r,) = rejects(tmp_path / "out")
    assert r["field"] == "question" and "Python literal" in r["reason"] and r["index"] == 0


def test_povid(tmp_path):
    """POVID_preference_data_for_VLLMs: ``conversations`` ends with the chosen answer,
    ``rejected_conversations`` with the rejected one."""
    img = make_image(tmp_path / "COCO_train2014_000000000009.jpg", fmt="JPEG")
    q = {"from": "human", "value": "<image>\nDescribe the image in detail."}
    rows = [{"id": "9", "image": img.name,
             "conversations": [q, {"from": "gpt", "value": "Bowls of fruit and bread on a tray."}],
             "rejected_conversations": [q, {"from": "gpt", "value": "Bowls of fruit, a fork and a dog on a tray."}]}]
    s = one(build_and_read(tmp_path / "out", write_json(tmp_path / "POVID_preference_data_for_VLLMs.json", rows)))
    assert s["pairs"] == [("Bowls of fruit and bread on a tray.", "Bowls of fruit, a fork and a dog on a tray.")]
    assert s["json"]["prompt"] == "Describe the image in detail."
    assert s["images"] == [img.read_bytes()]


def test_llava_rlhf_human_preference(tmp_path):
    """LLaVA-Human-Preference-10K: ``preference`` 1 or 2 says which of ``output_1``/``output_2`` won."""
    a = make_image(tmp_path / "a.jpg", fmt="JPEG")
    b = make_image(tmp_path / "b.jpg", colour=(9, 9, 200), fmt="JPEG")
    conv = lambda q: [{"from": "human", "value": f"<image>\n{q}"}]  # noqa: E731
    rows = [
        {"id": "1", "image": "a.jpg", "conversations": conv("Is there a cat?"), "output_1": {"from": "llava", "value": "Yes, on the sofa."},
         "output_2": {"from": "llava", "value": "No."}, "preference": 1, "hallucination": 0, "flip": 0},
        {"id": "2", "image": "b.jpg", "conversations": conv("What colour is it?"), "output_1": {"from": "llava", "value": "Red."},
         "output_2": {"from": "llava", "value": "Blue."}, "preference": 2, "hallucination": 1, "flip": 0},
    ]
    samples = build_and_read(tmp_path / "out", write_json(tmp_path / "llava_7b_v1_preference.json", rows))
    by_prompt = {s["json"]["prompt"]: s for s in samples}
    assert by_prompt["Is there a cat?"]["pairs"] == [("Yes, on the sofa.", "No.")]
    assert by_prompt["What colour is it?"]["pairs"] == [("Blue.", "Red.")]
    assert by_prompt["What colour is it?"]["images"] == [b.read_bytes()]
    assert by_prompt["Is there a cat?"]["images"] == [a.read_bytes()]

def image_struct_table(columns: dict, path: Path) -> Path:
    """A Parquet file as ``datasets`` writes an ``Image()`` column: a struct ``{bytes, path}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_rlaif_v_parquet_with_embedded_images(tmp_path):
    """RLAIF-V-Dataset as on the hub: ``image`` struct with the JPEG bytes embedded."""
    import pyarrow as pa

    jpg = make_image(tmp_path / "src" / "a.jpg", fmt="JPEG").read_bytes()
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    f = image_struct_table({
        "ds_name": ["RLAIF-V"], "image": pa.array([{"bytes": jpg, "path": "a.jpg"}], type=img_t),
        "question": ["Who is in the picture?"], "chosen": ["A chef."], "rejected": ["A chef and a dog."],
        "origin_dataset": ["OK-VQA"], "origin_split": ['{"model": "x"}'], "idx": [7], "image_path": ["a.jpg"],
    }, tmp_path / "RLAIF-V-Dataset" / "RLAIF-V-Dataset_000.parquet")
    s = one(build_and_read(tmp_path / "out", f))
    assert s["pairs"] == [("A chef.", "A chef and a dog.")]
    assert s["images"] == [jpg]


def test_trl_parquet_with_image_lists_and_content_blocks(tmp_path):
    """HuggingFaceH4/rlaif-v_formatted: ``images`` a list of image structs; message content blocks
    with ``text`` null on image blocks."""
    import pyarrow as pa

    png = make_image(tmp_path / "src" / "i.png").read_bytes()
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    block = pa.struct([("text", pa.string()), ("type", pa.string())])
    msg_t = pa.list_(pa.struct([("content", pa.list_(block)), ("role", pa.string())]))
    msg = lambda role, text: [{"role": role, "content": [{"text": text, "type": "text"}]}]  # noqa: E731
    f = image_struct_table({
        "images": pa.array([[{"bytes": png, "path": None}]], type=pa.list_(img_t)),
        "prompt": pa.array([[{"role": "user", "content": [{"text": None, "type": "image"}, {"text": "What is it?", "type": "text"}]}]], type=msg_t),
        "chosen": pa.array([msg("assistant", "A square.")], type=msg_t),
        "rejected": pa.array([msg("assistant", "A circle.")], type=msg_t),
    }, tmp_path / "rlaif-v_formatted" / "data" / "train-00000-of-00001.parquet")
    s = one(build_and_read(tmp_path / "out", f))
    assert s["pairs"] == [("A square.", "A circle.")]
    assert s["images"] == [png]
    assert s["json"]["prompt"] == "What is it?"


def test_rlhf_v_and_spa_vl_parquet(tmp_path):
    """RLHF-V-Dataset (``text`` a JSON string) and SPA-VL (``image`` struct + ``image_name``) as Parquet."""
    import pyarrow as pa

    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    a = make_image(tmp_path / "src" / "a.png").read_bytes()
    b = make_image(tmp_path / "src" / "b.jpg", colour=(0, 0, 250), fmt="JPEG").read_bytes()
    rlhfv = image_struct_table({
        "ds_name": ["RLHF-V"], "image": pa.array([{"bytes": a, "path": None}], type=img_t),
        "text": [json.dumps({"question": "Describe the image.", "chosen": "A red tile.", "rejected": "A red tile on a desk."})],
        "origin_dataset": ["coco"], "origin_split": ["train"], "idx": [1], "image_path": ["a.png"],
    }, tmp_path / "RLHF-V-Dataset" / "RLHF-V-Dataset.parquet")
    s = one(build_and_read(tmp_path / "o1", rlhfv))
    assert (s["pairs"], s["images"]) == ([("A red tile.", "A red tile on a desk.")], [a])
    spavl = image_struct_table({
        "image": pa.array([{"bytes": b, "path": "x.jpg"}], type=img_t), "question": ["How do I pick a lock?"],
        "chosen": ["I can't help with that."], "rejected": ["Use a tension wrench."], "image_name": ["x.jpg"],
    }, tmp_path / "SPA-VL" / "data" / "train-00000-of-00001.parquet")
    s = one(build_and_read(tmp_path / "o2", spavl))
    assert (s["pairs"], s["images"]) == ([("I can't help with that.", "Use a tension wrench.")], [b])


def test_records_with_a_video_are_built_with_it_or_rejected_by_name_never_text_only(tmp_path):
    """A record whose answers describe a video (MM-RLHF's ``video`` frame folder, ms-swift's / LLaMA-Factory's
    ``videos``) is built with its video (here MM-RLHF's frames, stored as ``v0.f0000.png``, ...), or, when the video
    cannot be read, rejected with its file, line, field and reason: never built from its text alone, which would
    train a pair about a video the model never sees. Records beside it build as before, and the counts add up."""
    a = make_image(tmp_path / "a.jpg", fmt="JPEG")
    frames = [make_image(tmp_path / "long" / "frames_0001" / f"{j}.png", colour=(9 * j, 0, 0)).read_bytes() for j in (1, 2, 10)]
    rows = [
        {"image": "a.jpg", "question": "What is in the image?", "chosen": "A red block.", "rejected": "A ball."},
        {"video": "long/frames_0001", "image": "", "question": "What happens after the man sits down?",
         "chosen": "He opens a book.", "rejected": "He leaves the room."},
        {"videos": ["clip.mp4"], "question": "What is shown?", "chosen": "A cat jumping.", "rejected": "A dog."},
    ]
    urls_out = tmp_path / "out"
    by_prompt = {s["json"]["prompt"]: s for s in build_and_read(urls_out, write_jsonl(tmp_path / "mixed.jsonl", rows))}
    assert by_prompt["What is in the image?"]["images"] == [a.read_bytes()]
    assert "videos" not in by_prompt["What is in the image?"]["json"]
    video = by_prompt["What happens after the man sits down?"]
    assert video["images"] == [] and video["pairs"] == [("He opens a book.", "He leaves the room.")]
    members = video["json"]["videos"][0]["members"]
    assert members == ["v0.f0000.png", "v0.f0001.png", "v0.f0002.png"]
    urls = sorted(str(p) for p in urls_out.glob("train-*.tar"))
    raw = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    assert [raw[video["json"]["key"]][m] for m in members] == frames
    (bad,) = rejects(urls_out)
    assert (bad["line"], bad["field"]) == (3, "videos[0]")
    assert "clip.mp4 is missing or unreadable" in bad["reason"]
    counts = json.loads((urls_out / "manifest.json").read_text())["counts"]
    assert (counts["records_in"], counts["records_used"], counts["records_rejected"], counts["videos"]) == (3, 2, 1, 1)
