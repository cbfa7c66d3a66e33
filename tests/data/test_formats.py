"""Each input format end to end: VLFeedback (rows and columns), HelpSteer-style rated rows, pairwise rows."""

import json

import pytest

from vpa_lightning.data import build

from .conftest import make_image, read_samples, rejects, vlf_completion, vlf_row, write_jsonl


def test_vlfeedback_column_form_equals_row_form(tmp_path):
    make_image(tmp_path / "a.png")
    comps = [vlf_completion("m1", "Red.", (5, 5, 5)), vlf_completion("m2", "Blue.", ("1", "2", "5"))]
    rows = vlf_row("a.png", "Colour?", comps)
    cols = dict(rows, completions={k: [c[k] for c in comps] for k in ("model", "response", "annotations")})
    write_jsonl(tmp_path / "rows.jsonl", [rows])
    write_jsonl(tmp_path / "cols.jsonl", [cols])
    a = read_samples(tmp_path / "o1") if build([tmp_path / "rows.jsonl"], tmp_path / "o1", val_fraction=0) else None
    b = read_samples(tmp_path / "o2") if build([tmp_path / "cols.jsonl"], tmp_path / "o2", val_fraction=0) else None
    ja, jb = (next(iter(x.values()))["json"] for x in (a, b))
    assert ja["responses"] == jb["responses"] and ja["pairs"] == jb["pairs"]
    assert [r["text"] for r in ja["responses"]] == ["Red.", "Blue."]


def test_na_rating_drops_only_that_completion(tmp_path):
    make_image(tmp_path / "a.png")
    rows = [vlf_row("a.png", "Q?", [
        vlf_completion("m1", "one", (5, 5, 5)),
        vlf_completion("m2", "two", ("N/A", 3, 3)),
        vlf_completion("m3", "three", (1, 1, 1)),
    ])]
    write_jsonl(tmp_path / "in.jsonl", rows)
    m = build([tmp_path / "in.jsonl"], tmp_path / "out", val_fraction=0)
    c = m["counts"]
    assert (c["records_in"], c["records_used"], c["records_rejected"], c["responses_rejected"]) == (1, 1, 0, 1)
    (r,) = rejects(tmp_path / "out")
    assert r == {"file": str(tmp_path / "in.jsonl"), "line": 1, "kind": "response",
                 "field": "completions[1].annotations.Helpfulness", "reason": 'non-numeric rating "N/A"'}
    (s,) = read_samples(tmp_path / "out").values()
    assert [x["text"] for x in s["json"]["responses"]] == ["one", "three"]


def test_rated_rows_with_declared_aspects(tmp_path):
    make_image(tmp_path / "i.jpg", fmt="JPEG")
    row = {"prompt": "Describe.", "image": "i.jpg", "responses": [
        {"text": "good", "model": "x", "scores": {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2}},
        {"text": "bad", "model": "y", "helpfulness": 1, "correctness": 0, "coherence": 2, "complexity": 2, "verbosity": 2},
        {"text": "mid", "model": "z", "scores": {"helpfulness": 3, "correctness": 3, "coherence": 3, "complexity": 2, "verbosity": 2}},
    ]}
    write_jsonl(tmp_path / "rated.jsonl", [row])
    # Means over the five HelpSteer aspects: good 3.2, mid 2.6, bad 1.4. With the MM-DPO default
    # margin of 2 nothing qualifies (the record is rejected with the reason); with 1.5 good > bad.
    m = build([tmp_path / "rated.jsonl"], tmp_path / "out0", strategy="best-vs-rest", val_fraction=0, allow_empty=True)
    assert m["counts"]["records_rejected"] == 1 and "below margin 2" in rejects(tmp_path / "out0")[0]["reason"]
    m = build([tmp_path / "rated.jsonl"], tmp_path / "out", strategy="best-vs-rest", min_margin=1.5, val_fraction=0)
    (s,) = read_samples(tmp_path / "out").values()
    js = s["json"]
    assert s["ext"] == "jpg"
    assert [r["text"] for r in js["responses"]] == ["good", "mid", "bad"]
    assert [(p["chosen"], p["rejected"]) for p in js["pairs"]] == [(0, 2)]
    assert js["pairs"][0]["margin"] == pytest.approx(1.8)
    # Declared aspects with weights: only correctness counts, weight 2.
    m = build([tmp_path / "rated.jsonl"], tmp_path / "out2", strategy="best-vs-rest", aspects="correctness=2", val_fraction=0)
    (s,) = read_samples(tmp_path / "out2").values()
    js = s["json"]
    assert js["responses"][0]["scores"] == {"correctness": 4.0}
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in js["pairs"]] == [(0, 2, 4.0)]


def test_pairwise_spellings_and_identical_pairs(tmp_path):
    make_image(tmp_path / "a.png", colour=(1, 2, 3))
    make_image(tmp_path / "b.png", colour=(4, 5, 6))
    make_image(tmp_path / "c.png", colour=(7, 8, 9))
    rows = [
        {"image": "a.png", "question": "Q1", "chosen": "yes", "reject": "no"},  # SeVa
        {"image": "b.png", "conversations": [{"from": "human", "value": "<image>\nQ2"}, {"from": "gpt", "value": "x"}],
         "chosen": [{"from": "gpt", "value": "cat"}], "rejected": [{"from": "gpt", "value": "dog"}]},  # LLaVA-style
        {"image": "c.png", "text": json.dumps({"question": "Q3", "chosen": "same", "rejected": " same\n"})},  # RLHF-V, identical
        {"image": "c.png", "question": "Q4", "chosen": "Same", "rejected": "same"},  # differ in case: a pair
    ]
    write_jsonl(tmp_path / "pw.jsonl", rows)
    m = build([tmp_path / "pw.jsonl"], tmp_path / "out", val_fraction=0)
    c = m["counts"]
    assert (c["records_in"], c["groups"], c["pairs"], c["pairs_dropped_identical"], c["records_rejected"]) == (4, 3, 3, 1, 1)
    by_prompt = {s["json"]["prompt"]: s["json"] for s in read_samples(tmp_path / "out").values()}
    assert set(by_prompt) == {"Q1", "Q2", "Q4"}
    q2 = by_prompt["Q2"]
    assert [r["text"] for r in q2["responses"]] == ["cat", "dog"]
    assert q2["pairs"] == [{"chosen": 0, "rejected": 1, "probability": pytest.approx(q2["pairs"][0]["probability"]), "margin": 1.0}]
    assert q2["pairs"][0]["probability"] > 0.5
    (r,) = rejects(tmp_path / "out")
    assert r["line"] == 3 and "identical 1" in r["reason"]


def test_forced_format_and_absolute_image_paths(tmp_path):
    img = make_image(tmp_path / "elsewhere" / "x.png")
    write_jsonl(tmp_path / "data" / "in.jsonl", [{"image": str(img), "question": "Q", "chosen": "a", "rejected": "b"}])
    m = build([tmp_path / "data" / "in.jsonl"], tmp_path / "out", format="pairwise", val_fraction=0)
    assert m["counts"]["groups"] == 1
    # Forcing the wrong format rejects with the missing field named.
    m = build([tmp_path / "data" / "in.jsonl"], tmp_path / "out2", format="vlfeedback", val_fraction=0, allow_empty=True)
    (r,) = rejects(tmp_path / "out2")
    assert m["counts"]["records_rejected"] == 1 and (r["field"], r["reason"]) == ("completions", "missing field")


def test_image_root_and_directory_input(tmp_path):
    make_image(tmp_path / "imgs" / "a.png")
    write_jsonl(tmp_path / "ann" / "p1.jsonl", [{"image": "a.png", "question": "Q", "chosen": "a", "rejected": "b"}])
    write_jsonl(tmp_path / "ann" / "p2.jsonl", [{"image": "a.png", "question": "Q other", "chosen": "a", "rejected": "b"}])
    m = build([tmp_path / "ann"], tmp_path / "out", image_root=tmp_path / "imgs", val_fraction=0)
    assert m["counts"]["groups"] == 2
