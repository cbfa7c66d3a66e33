"""Deduplication across records and files; near-duplicate prompts behind a flag."""

from vpa_lightning.data import build
from vpa_lightning.rust_pairs import normalize_text

from .conftest import make_image, read_samples, vlf_completion, vlf_row, write_jsonl


def test_default_merges_only_exact_duplicates(tmp_path):
    """Issue 11: "Yes." rated 5 and "yes." rated 2 stay two responses; case-different prompts stay apart."""
    make_image(tmp_path / "a.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    write_jsonl(tmp_path / "one.jsonl", [
        vlf_row("a.png", "<image>\nIs it red?", [vlf_completion("m1", "Yes.", (5, 5, 5)), vlf_completion("m2", "No.", (1, 1, 1))]),
        vlf_row("a.png", "is it red?", [vlf_completion("m5", "Yes.", (4, 4, 4)), vlf_completion("m6", "No.", (2, 2, 2))]),
    ])
    write_jsonl(tmp_path / "two.jsonl", [vlf_row("copy.png", "  Is it \n red? ", [
        vlf_completion("m3", "yes.", (2, 2, 2)), vlf_completion("m4", " No. ", (3, 3, 3))])])
    m = build([tmp_path / "one.jsonl", tmp_path / "two.jsonl"], tmp_path / "out", val_fraction=0)
    c = m["counts"]
    assert (c["records_in"], c["records_used"], c["records_deduplicated"], c["groups"]) == (3, 2, 1, 2)
    assert c["responses_collapsed"] == 1  # " No. " is "No." after trimming
    by_prompt = {s["json"]["prompt"]: s["json"] for s in read_samples(tmp_path / "out").values()}
    assert set(by_prompt) == {"Is it red?", "is it red?"}
    js = by_prompt["Is it red?"]
    scores = {r["text"]: r["scores"]["Helpfulness"] for r in js["responses"]}
    assert scores == {"Yes.": 5.0, "yes.": 2.0, "No.": 2.0}  # No.: mean of 1 and 3
    assert m["config"]["dedup"] == "exact"


def test_normalized_dedup_merges_case_and_spacing(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())  # same bytes, other name
    write_jsonl(tmp_path / "one.jsonl", [vlf_row("a.png", "What is it?", [
        vlf_completion("m1", "A square.", (5, 5, 5)), vlf_completion("m2", "A cat.", (1, 1, 1))])])
    write_jsonl(tmp_path / "two.jsonl", [vlf_row("copy.png", "  what is   IT? ", [
        vlf_completion("m3", "a square.", (3, 3, 3)), vlf_completion("m4", "A dog.", (2, 2, 2))])])
    m = build([tmp_path / "one.jsonl", tmp_path / "two.jsonl"], tmp_path / "out", val_fraction=0, dedup="normalized")
    c = m["counts"]
    assert (c["records_in"], c["records_used"], c["records_deduplicated"], c["groups"]) == (2, 1, 1, 1)
    assert c["responses_collapsed"] == 1
    (s,) = read_samples(tmp_path / "out").values()
    js = s["json"]
    assert [x["text"] for x in js["responses"]] == ["A square.", "A dog.", "A cat."]
    # The collapsed response averages its ratings (5 and 3).
    assert js["responses"][0]["scores"]["Helpfulness"] == 4.0
    assert js["source"] == [{"file": str(tmp_path / "one.jsonl"), "line": 1}, {"file": str(tmp_path / "two.jsonl"), "line": 1}]
    assert len(js["pairs"]) == 3


def test_near_duplicates_only_with_flag(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", colour=(0, 255, 0))
    p1 = "Please describe the large red square shown in the centre of this image in detail"
    p2 = "Please describe the large red square shown in the centre of this image in detail now"
    rows = [
        vlf_row("a.png", p1, [vlf_completion("m1", "one", (5, 5, 5)), vlf_completion("m2", "two", (1, 1, 1))]),
        vlf_row("a.png", p2, [vlf_completion("m3", "three", (3, 3, 3)), vlf_completion("m4", "four", (2, 2, 2))]),
        vlf_row("b.png", p2, [vlf_completion("m3", "three", (3, 3, 3)), vlf_completion("m4", "four", (2, 2, 2))]),
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert build([tmp_path / "in.jsonl"], tmp_path / "off", val_fraction=0)["counts"]["groups"] == 3
    m = build([tmp_path / "in.jsonl"], tmp_path / "on", val_fraction=0, near_dup=0.8)
    c = m["counts"]
    assert (c["groups"], c["records_deduplicated"], c["prompts_near_duplicate"]) == (2, 1, 1)
    sizes = sorted(len(s["json"]["responses"]) for s in read_samples(tmp_path / "on").values())
    assert sizes == [2, 4]  # different images never merge


def test_normalisation():
    assert normalize_text("<image>\n  Ｗhat  IS\tthis? ") == "what is this?"
