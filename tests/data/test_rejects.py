"""Every bad-input class is rejected with file, line, field and reason; nothing stops the build."""

import json

import pytest

from vpa_lightning.data import ConfigError, EmptyBuildError, InputFileError, build

from .conftest import make_image, read_samples, rejects, vlf_completion, vlf_row


def good(img="ok.png", prompt="Q?"):
    return vlf_row(img, prompt, [vlf_completion("a", "yes", (5, 5, 5)), vlf_completion("b", "no", (1, 1, 1))])


def test_each_bad_input_class(tmp_path):
    make_image(tmp_path / "ok.png")
    make_image(tmp_path / "ok2.png", colour=(0, 0, 255))
    png = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "text.jpg").write_bytes(b"this is not an image")
    (tmp_path / "adir.png").mkdir()
    long_text = "x" * 200
    lines = [
        json.dumps(good()),                                                           # 1 ok
        '{"prompt": "Q?", "img_path": "ok.png", "completions": [',                    # 2 malformed JSON
        json.dumps({"img_path": "ok.png", "completions": []}),                        # 3 missing prompt
        json.dumps(good(img="missing.png")),                                          # 4 missing image
        json.dumps(good(img="adir.png")),                                             # 5 unreadable image (a directory)
        json.dumps(good(img="truncated.png")),                                        # 6 undecodable image
        json.dumps(good(img="text.jpg")),                                             # 7 not an image
        json.dumps(vlf_row("ok.png", "Q3", [vlf_completion("a", "y", ("N/A",) * 3), vlf_completion("b", "n", ("?", 1, 1))])),  # 8 no numeric rating
        json.dumps(vlf_row("ok.png", "Q4", [vlf_completion("a", "   ", (5, 5, 5)), vlf_completion("b", "n", (1, 1, 1))])),  # 9 empty response
        json.dumps(dict(good(), prompt=["not", "a", "string"])),                      # 10 wrong type
        json.dumps(dict(good(), prompt=long_text)),                                   # 11 absurdly long text
        "",                                                                           # 12 blank line (not a record)
        json.dumps([1, 2, 3]),                                                        # 13 not an object
        json.dumps(good(img="ok2.png")),                                              # 14 ok
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff\xfe"}\n')  # 15 invalid UTF-8
    m = build([path], tmp_path / "out", max_text_chars=100, val_fraction=0)
    c = m["counts"]
    assert c["records_in"] == 14 and c["blank_lines"] == 1
    assert c["records_in"] == c["records_used"] + c["records_deduplicated"] + c["records_rejected"]
    # Line 9 keeps one response: a group of one is rejected at ranking time, with its own reason.
    assert c["records_used"] == 2 and c["records_rejected"] == 12
    by_line = {}
    for r in rejects(tmp_path / "out"):
        assert r["file"] == str(path)
        by_line.setdefault(r["line"], []).append(r)
    expect = {
        2: ("$", "malformed JSON"),
        3: ("prompt", "missing field"),
        4: ("image", "missing or unreadable"),
        5: ("image", "not a regular file"),
        6: ("image", "does not decode"),
        7: ("image", "not a recognised image format"),
        8: ("completions", "no rankable response"),
        10: ("prompt", "expected a string, got array"),
        11: ("prompt", "over the limit of 100"),
        13: ("$", "expected a JSON object"),
        15: ("$", "invalid UTF-8"),
    }
    for line, (field, reason) in expect.items():
        rec = [r for r in by_line[line] if r["kind"] == "record"]
        assert len(rec) == 1, (line, by_line[line])
        assert rec[0]["field"] == field and reason in rec[0]["reason"], (line, rec[0])
    # Per-response reasons are kept too.
    assert {r["field"] for r in by_line[8] if r["kind"] == "response"} == {
        "completions[0].annotations.Helpfulness", "completions[1].annotations.Helpfulness"}
    assert [(r["kind"], r["field"]) for r in by_line[9]][0] == ("response", "completions[0].response")
    assert any(r["kind"] == "record" and "fewer than two" in r["reason"] for r in by_line[9])
    assert 12 not in by_line
    assert len(read_samples(tmp_path / "out")) == 2


def test_fatal_errors_are_typed_and_name_the_flag(tmp_path):
    with pytest.raises(InputFileError, match="nope.jsonl"):
        build([tmp_path / "nope.jsonl"], tmp_path / "out")
    (tmp_path / "x.jsonl").write_text("")
    with pytest.raises(ConfigError, match="--strategy"):
        build([tmp_path / "x.jsonl"], tmp_path / "out", strategy="best-of-all")
    with pytest.raises(ConfigError, match="--val-fraction"):
        build([tmp_path / "x.jsonl"], tmp_path / "out", val_fraction=1.5)
    with pytest.raises(ConfigError, match="--partition"):
        build([tmp_path / "x.jsonl"], tmp_path / "out", partition="4/4")
    with pytest.raises(ConfigError, match="--aspects"):
        build([tmp_path / "x.jsonl"], tmp_path / "out", aspects="Helpfulness=lots")
    with pytest.raises(ConfigError, match="--bt-prior"):
        build([tmp_path / "x.jsonl"], tmp_path / "out", bt_prior=0)


def test_empty_input_fails_loudly_but_writes_its_accounting(tmp_path):
    (tmp_path / "x.jsonl").write_text("\n\n")
    with pytest.raises(EmptyBuildError, match=r"(?s)no input record.*x.jsonl \(jsonl, layout not detected\): 0 records in") as e:
        build([tmp_path / "x.jsonl"], tmp_path / "out")
    m = e.value.manifest
    assert m["shards"] == [] and m["counts"]["records_in"] == 0 and m["counts"]["blank_lines"] == 2
    assert (tmp_path / "out" / "manifest.json").exists()
    assert build([tmp_path / "x.jsonl"], tmp_path / "out", allow_empty=True)["counts"]["records_in"] == 0


def test_garbage_and_mutated_input_never_panics(tmp_path):
    """Seeded fuzzing: random bytes, truncated/mutated records and mutated image files.

    The build must finish, account for every record, and raise nothing."""
    import random

    rng = random.Random(1234)
    make_image(tmp_path / "ok.png")
    make_image(tmp_path / "ok.jpg", fmt="JPEG")
    images = ["ok.png", "ok.jpg"]
    for k, src in enumerate(["ok.png", "ok.jpg"] * 10):
        data = bytearray((tmp_path / src).read_bytes())
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            pos = rng.randrange(len(data))
            if op < 0.4:
                data[pos] = rng.randrange(256)
            elif op < 0.7:
                del data[pos:pos + rng.randint(1, 64)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        name = f"m{k}.{src.split('.')[1]}"
        (tmp_path / name).write_bytes(bytes(data))
        images.append(name)
    base = json.dumps(good())
    lines = []
    for i in range(300):
        r = rng.random()
        if r < 0.2:
            lines.append(bytes(rng.randrange(1, 256) for _ in range(rng.randint(1, 200))).replace(b"\n", b" "))
        elif r < 0.4:
            cut = base[: rng.randrange(len(base))]
            lines.append(cut.encode())
        elif r < 0.6:
            s = list(base)
            for _ in range(rng.randint(1, 5)):
                s[rng.randrange(len(s))] = rng.choice('{}[]":,0aN\\ ')
            lines.append("".join(s).encode())
        else:
            row = good(img=rng.choice(images), prompt=f"Q{i % 17}?")
            if rng.random() < 0.3:
                row["completions"][0]["annotations"]["Helpfulness"]["Rating"] = rng.choice(["x", None, [], {}, "1e999", -3])
            lines.append(json.dumps(row).encode())
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    for check in ("structure", "decode", "header"):
        m = build([path], tmp_path / f"out-{check}", image_check=check, val_fraction=0.1)
        c = m["counts"]
        assert c["records_in"] + c["blank_lines"] == 300
        assert c["records_in"] == c["records_used"] + c["records_deduplicated"] + c["records_rejected"]
        assert c["records_used"] > 0
        kinds = [r["kind"] for r in rejects(tmp_path / f"out-{check}")]
        assert kinds.count("record") == c["records_rejected"]
        assert kinds.count("response") == c["responses_rejected"]
