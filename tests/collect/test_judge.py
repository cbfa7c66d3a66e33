"""vpa judge: rule, hf and openai judges on sampled files, their output read by vpa-shard build as it is; the
openai backends (sampling and judging) against real HTTP servers on 127.0.0.1: a tiny model served by vpa serve,
and a server answering with hand-written judge replies (good, refused, off the scale, two ratings)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.collect.conftest import DEMO_CHOICES
from tests.conftest import console_script
from vpa_lightning.collect.judge import rule_rating


def _vpa(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([console_script("vpa"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sampled(demo_prompts, tmp_path_factory) -> Path:
    """The demo prompts sampled by the tiny LLaVA, plus a known right and a known wrong answer per prompt (so the
    rule judge has both to tell apart)."""
    root = tmp_path_factory.mktemp("sampled")
    proc = _vpa("sample", str(demo_prompts), "--model", "m=tiny:llava", "--k", "2", "--max-new-tokens", "8",
                "--out", str(root / "s.jsonl"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(root / "s.jsonl")
    from vpa_lightning.data.demo import _VOCABULARY

    for row in rows:
        answer = row["truth"]["answer"]
        wrong = next(w for w in _VOCABULARY[row["truth"]["kind"]] if w != answer)  # the same kind, another value
        row["completions"] += [{"model": "oracle", "response": f"It is {answer}."},
                               {"model": "liar", "response": f"It is {wrong}, not {answer}."}]
    path = root / "sampled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rule_judge_and_the_build_reads_its_file(sampled, tmp_path) -> None:
    out = tmp_path / "judged.jsonl"
    proc = _vpa("judge", str(sampled), "--judge", "rule", "--reference", "truth.answer", "--choices", DEMO_CHOICES,
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(out)
    for row in rows:
        ratings = {c["model"]: c["annotations"]["Verified"]["Rating"] for c in row["completions"] if c["model"] != "m"}
        assert ratings == {"oracle": 1.0, "liar": 0.0}
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["completions"] == summary["rated"] + summary["rejected"] == 4 * len(rows)
    build = subprocess.run([console_script("vpa-shard"), "build", str(out), "--out", str(tmp_path / "shards"),
                            "--aspects", "Verified", "--val-fraction", "0"], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-2000:]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["counts"]["groups"] == len(rows) and manifest["counts"]["pairs"] >= len(rows)  # oracle over liar, each group
    assert _rows(sampled) == _rows(sampled)  # the input is never touched
    proc = _vpa("judge", str(sampled), "--judge", "rule", "--out", str(tmp_path / "x.jsonl"))
    assert proc.returncode == 2 and "--reference" in proc.stderr
    proc = _vpa("judge", str(sampled), "--judge", "rule", "--reference", "truth.answer", "--out", str(sampled))
    assert proc.returncode == 2 and "never overwritten" in proc.stderr


def test_rule_kinds() -> None:
    assert rule_rating("exact", " Red! ", "red") == 1.0 and rule_rating("exact", "red car", "red") == 0.0
    assert rule_rating("contains", "Two red circles.", "circle", ["circle", "square"]) == 1.0
    assert rule_rating("contains", "A circle and a square.", "circle", ["circle", "square"]) == 0.0
    assert rule_rating("yesno", "Yes, there is.", "yes") == 1.0 and rule_rating("yesno", "No.", True) == 0.0
    assert rule_rating("yesno", "Perhaps.", "yes") == 0.0
    assert rule_rating("choice", "(B) the dog", "B") == 1.0 and rule_rating("choice", "A", "(C)") == 0.0
    assert rule_rating("number", "About 3.05 metres", 3, tolerance=0.1) == 1.0
    assert rule_rating("number", "1,200", 1200) == 1.0 and rule_rating("number", "none", 2) == 0.0
    with pytest.raises(ValueError, match="--rule"):
        rule_rating("fuzzy", "x", "y")


@pytest.mark.parametrize("rubric", ["vlfeedback", "claims"])
def test_hf_judge_scores_by_the_rating_token_probabilities(sampled, tmp_path, rubric) -> None:
    out = tmp_path / "judged.jsonl"
    proc = _vpa("judge", str(sampled), "--judge", "hf", "--model", "tiny:llava", "--rubric", rubric, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(out)
    for row in rows:
        for c in row["completions"]:
            if rubric == "vlfeedback":
                assert set(c["annotations"]) == {"Helpfulness", "Visual Faithfulness", "Ethical Considerations"}
                assert all(1.0 <= a["Rating"] <= 5.0 and a["Rationale"].startswith("p_scale=") for a in c["annotations"].values())
            else:
                detail = json.loads(c["annotations"]["Claims"]["Rationale"])
                assert c["annotations"]["Claims"]["Rating"] == -len(detail["rejected"]) <= 0
    again = tmp_path / "again.jsonl"
    assert _vpa("judge", str(sampled), "--judge", "hf", "--model", "tiny:llava", "--rubric", rubric, "--out", str(again)).returncode == 0
    assert again.read_bytes() == out.read_bytes()  # deterministic
    if rubric == "vlfeedback":
        build = subprocess.run([console_script("vpa-shard"), "build", str(out), "--out", str(tmp_path / "shards"),
                                "--recipe", "silkie", "--val-fraction", "0"], capture_output=True, text=True, timeout=120)
        assert build.returncode == 0, build.stderr[-2000:]


# ------------------------------------------------------------------ openai backends, real HTTP servers
class _ScriptedJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that answers judge requests with hand-written replies, by what the answer says:
    'REFUSE' -> a refusal, 'SEVEN' -> a rating off the scale, 'TWICE' -> two ratings, else a good reply (4s for an
    answer naming red, 2s otherwise). Claims: split on '. ', a claim is true when it names red."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        text = " ".join(p.get("text", "") for m in body["messages"] if isinstance(m["content"], list) for p in m["content"])
        answer = re.search(r"<answer>\n(.*)\n</answer>", text, flags=re.DOTALL)
        answer = answer.group(1) if answer else ""
        aspects = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations") if "Visual Faithfulness" in text else \
            ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
        if "Split the answer" in text:
            reply = json.dumps([s for s in answer.split(". ") if s])
        elif "Is this claim about the image true?" in text:
            reply = "yes" if "red" in text.split("Claim:")[1] else "no"
        elif "REFUSE" in answer:
            reply = "I'm sorry, but I can't help with that."
        else:
            top = 1 if aspects[0] == "helpfulness" else 2
            score = 7 if "SEVEN" in answer else (4 if "red" in answer else top)
            reply = "\n".join(f"### {a}\nRating: {score}\n" + ("Rating: 3\n" if "TWICE" in answer else "") +
                              "Rationale: scripted." for a in aspects)
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def scripted_judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("rubric", "recipe"), [("vlfeedback", "silkie"), ("helpsteer", "mmdpo"), ("claims", None)])
def test_openai_judge_against_a_real_server(sampled, tmp_path, scripted_judge, rubric, recipe) -> None:
    rows = _rows(sampled)
    rows[0]["completions"] += [{"model": "bad", "response": "Please REFUSE."}, {"model": "bad", "response": "SEVEN red"},
                               {"model": "bad", "response": "TWICE red"}, {"model": "bad", "response": "  "}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {"VPA_JUDGE_API_KEY": "test-key"}
    args = ("judge", str(source), "--judge", "openai", "--rubric", rubric, "--base-url", scripted_judge, "--model",
            "gpt-judge", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "judged.jsonl"))
    _ScriptedJudge.seen.clear()
    proc = _vpa(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sent = len(_ScriptedJudge.seen)
    assert sent > 0 and all(b["model"] == "gpt-judge" and b["temperature"] == 0 for b in _ScriptedJudge.seen)
    assert all(any(p.get("type") == "image_url" and p["image_url"]["url"].startswith("data:image/png;base64,")
                   for m in b["messages"] if isinstance(m["content"], list) for p in m["content"]) for b in _ScriptedJudge.seen)
    judged = _rows(tmp_path / "judged.jsonl")
    bad = [c for c in judged[0]["completions"] if c["model"] == "bad"]
    summary = json.loads((tmp_path / "judged.jsonl.summary.json").read_text())
    rejects = _rows(tmp_path / "judged.jsonl.rejects.jsonl")
    assert summary["completions"] == summary["rated"] + summary["rejected"] and summary["rejected"] == len(rejects)
    if rubric == "claims":
        assert bad[-1]["judge_error"] == "empty response"
        oracle = next(c for c in judged[0]["completions"] if c["model"] == "oracle")
        assert oracle["annotations"]["Claims"]["Rating"] == (0.0 if "red" in oracle["response"] else -1.0)
    else:
        reasons = [c.get("judge_error", "") for c in bad]
        assert "no '### <aspect>' section" in reasons[0] and "outside the scale" in reasons[1]
        assert "2 ratings for" in reasons[2] and reasons[3] == "empty response"
        assert all("annotations" not in c for c in bad)  # never a score
        assert {r["reason"] for r in rejects} >= set(reasons)
        build = subprocess.run([console_script("vpa-shard"), "build", str(tmp_path / "judged.jsonl"), "--out",
                                str(tmp_path / "shards"), "--recipe", recipe, "--val-fraction", "0"],
                               capture_output=True, text=True, timeout=120)
        assert build.returncode == 0, build.stderr[-2000:]
        # Bradley-Terry across the aspects: pairs kept by their BT probability
        bt = subprocess.run([console_script("vpa-shard"), "build", str(tmp_path / "judged.jsonl"), "--out",
                             str(tmp_path / "bt"), "--strategy", "min-probability", "--min-probability", "0.6",
                             "--val-fraction", "0", "--aspects", ",".join(c for c in judged[1]["completions"][0]["annotations"])],
                            capture_output=True, text=True, timeout=120)
        assert bt.returncode == 0, bt.stderr[-2000:]
        pairs = json.loads((tmp_path / "bt" / "manifest.json").read_text())["counts"]["pairs"]
        assert pairs > 0
    # a rerun (parts removed) pays nothing: every request comes from the cache
    import shutil

    shutil.rmtree(tmp_path / "judged.jsonl.parts")
    _ScriptedJudge.seen.clear()
    assert _vpa(*args, env=env).returncode == 0 and _ScriptedJudge.seen == []
    assert json.loads((tmp_path / "judged.jsonl.summary.json").read_text())["requests"]["cache_hits"] == sent


def test_openai_sampling_from_a_served_model_and_its_cache(demo_prompts, tmp_path, served_llava) -> None:
    url, count = served_llava
    args = ("sample", str(demo_prompts), "--backend", "openai", "--base-url", url, "--model", "served=tiny-llava",
            "--k", "3", "--max-new-tokens", "6", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o.jsonl"))
    before = count["requests"]
    proc = _vpa(*args, env={"VPA_SAMPLE_API_KEY": "EMPTY"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(tmp_path / "o.jsonl")
    n = len(_rows(demo_prompts))
    assert len(rows) == n and all(len(r["completions"]) == 3 and r["models"] == ["served"] for r in rows)
    assert count["requests"] - before == n  # one request per prompt, n=3 in it
    import shutil

    shutil.rmtree(tmp_path / "o.jsonl.parts")
    proc = _vpa(*args, env={"VPA_SAMPLE_API_KEY": "EMPTY"})
    assert proc.returncode == 0 and count["requests"] - before == n  # the rerun came from the cache
    assert _rows(tmp_path / "o.jsonl") == rows


def test_serve_answers_the_openai_protocol_and_refuses_bad_requests(served_llava) -> None:
    import base64
    import urllib.error
    import urllib.request

    url, _ = served_llava
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 0, 0)).save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def post(body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, reply = post({"model": "tiny-llava", "n": 2, "max_tokens": 5, "seed": 3, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Colour?"}]}]})
    assert status == 200 and len(reply["choices"]) == 2 and reply["usage"]["completion_tokens"] > 0
    assert post({"model": "tiny-llava", "n": 2, "max_tokens": 5, "seed": 3, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Colour?"}]}]})[1]["choices"] == reply["choices"]
    for bad, why in (({"messages": []}, "non-empty"),
                     ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}, "data: URLs"),
                     ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "k must be >= 1")):
        status, reply = post(bad)
        assert status == 400 and why in reply["error"]["message"]
    with urllib.request.urlopen(f"{url}/models", timeout=30) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny-llava"


class _OneChoice(BaseHTTPRequestHandler):
    """A server that answers every request with a single choice, whatever n asked for."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "only one"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_a_reply_with_fewer_choices_than_asked_fails_the_run_clearly(demo_prompts, tmp_path) -> None:
    """n=3 asked, one choice back: an error naming the reply (exit 1), nothing cached or written as sampled."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OneChoice)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = _vpa("sample", str(demo_prompts), "--backend", "openai", "--base-url",
                    f"http://127.0.0.1:{server.server_address[1]}/v1", "--model", "x=served", "--k", "3",
                    "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o.jsonl"), env={"VPA_SAMPLE_API_KEY": "k"})
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 1 and "1 choices for n=3" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_rule_judge_reads_each_records_choices(sampled, tmp_path) -> None:
    """--choices-field: an answer may name only the right word of the kind asked; words of other kinds are fine (a
    colour question answered "two red circles" is right), where one --choices list over every kind rejects it."""
    from vpa_lightning.data.demo import NUMBERS

    rows = _rows(sampled)
    for row in rows:
        truth = row["truth"]
        full = f"There are {NUMBERS[truth['count']]} {truth['colour']} {truth['shape']}s."
        row["completions"] = [{"model": "full", "response": full}]
    rows[0]["truth"].pop("choices")  # a record without its choices: rejected by name, not rated
    source = tmp_path / "full.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    per_record, one_list = tmp_path / "per-record.jsonl", tmp_path / "one-list.jsonl"
    proc = _vpa("judge", str(source), "--judge", "rule", "--reference", "truth.answer", "--choices-field",
                "truth.choices", "--out", str(per_record))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rated = [c["annotations"]["Verified"]["Rating"] for r in _rows(per_record)[1:] for c in r["completions"]]
    assert rated and set(rated) == {1.0}
    assert "no choices field 'truth.choices'" in Path(f"{per_record}.rejects.jsonl").read_text()
    summary = json.loads(Path(f"{per_record}.summary.json").read_text())
    assert (summary["rated"], summary["rejected"]) == (len(rows) - 1, 1)
    proc = _vpa("judge", str(source), "--judge", "rule", "--reference", "truth.answer", "--choices", DEMO_CHOICES,
                "--out", str(one_list))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {c["annotations"]["Verified"]["Rating"] for r in _rows(one_list) for c in r["completions"]} == {0.0}
    proc = _vpa("judge", str(source), "--judge", "rule", "--reference", "truth.answer", "--choices", "red",
                "--choices-field", "truth.choices", "--out", str(tmp_path / "both.jsonl"))
    assert proc.returncode == 2 and "not both" in proc.stderr


@pytest.mark.parametrize("rubric", ["vlfeedback", "claims"])
def test_hf_judge_shares_the_image_and_question_across_its_rows(sampled, rubric) -> None:
    """The rows of a prompt (answers x aspects, or one per claim) run the image and question once: the same scores
    as every row run whole, and the vision tower sees one image."""
    from unittest import mock

    from vpa_lightning.collect.judge import _HFJudge
    from vpa_lightning.collect.prompts import _record
    from vpa_lightning.collect.rubrics import load_rubric

    judge = _HFJudge(load_rubric(rubric), "tiny:llava", None, "cpu")
    row = _rows(sampled)[0]
    prompt = _record(row, f"{sampled}:1", sampled.parent, row["id"])
    answers = [c["response"] for c in row["completions"]] + ["A red circle. It is large. Nothing else is there."]
    media = judge.load(prompt)
    images_seen: list[int] = []
    hook = judge.model.model.vision_tower.register_forward_hook(lambda m, args, out: images_seen.append(args[0].shape[0]))
    try:
        shared = judge.rate(prompt, answers, media)
    finally:
        hook.remove()
    assert images_seen == [1]
    with mock.patch("vpa_lightning.models.generation.shared_prefix_next_logits", return_value=None):
        whole = judge.rate(prompt, answers, media)
    for a, b in zip(shared, whole):
        assert set(a) == set(b)
        for aspect in a:
            assert a[aspect][0] == pytest.approx(b[aspect][0], abs=1e-4)
            if rubric == "claims":
                assert a[aspect][1] == b[aspect][1]  # the same claims rejected
