"""Plain-Python reference build: the peer of the Rust shard builder in ``shard_build.py``.

It produces the same samples as ``vpa-shard build --strategy all-pairs`` for VLFeedback rows
(same keys, split, shuffle order, pairs and Bradley-Terry strengths; duplicates merged as the
default ``--dedup exact`` merges them: same image bytes, same prompt after ``<image>`` removal
and whitespace collapse, response texts equal after trimming) with only the standard
library plus Pillow for image validation: json + hashlib + tarfile + a Python BT fit. It exists
to be timed, not used; the benchmark checks that both builds agree before it reports ratios.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import tarfile
from pathlib import Path

from PIL import Image

ASPECTS = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")
MTIME = 1_704_067_200
JPEG_MAGIC = b"\xff\xd8"


def hash64(*parts: bytes) -> int:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return int.from_bytes(h.digest()[:8], "big")


def prompt_identity(s: str) -> str:
    """The default (``--dedup exact``) prompt identity: ``<image>`` removed, whitespace collapsed."""
    return " ".join(s.replace("<image>", " ").split())


def response_identity(s: str) -> str:
    """The default (``--dedup exact``) response identity: the text without surrounding whitespace."""
    return s.strip()


def rating(v):
    if isinstance(v, dict):
        v = next((x for k, x in v.items() if k.lower() == "rating"), None)
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def bt_fit(wins: list[list[float]], alpha: float) -> list[float]:
    """Penalised Bradley-Terry by Newton's method with backtracking (pure Python)."""
    n = len(wins)
    theta = [0.0] * n

    def objective(th):
        ll = sum(wins[i][j] * log_sigmoid(th[i] - th[j]) for i in range(n) for j in range(n) if wins[i][j])
        return ll - 0.5 * alpha * sum(t * t for t in th)

    f = objective(theta)
    for _ in range(100):
        g = [-alpha * t for t in theta]
        h = [[0.0] * n for _ in range(n)]
        for i in range(n):
            h[i][i] += alpha
            for j in range(n):
                if i == j:
                    continue
                nij = wins[i][j] + wins[j][i]
                if nij == 0:
                    continue
                p = sigmoid(theta[i] - theta[j])
                g[i] += wins[i][j] - nij * p
                c = nij * p * (1 - p)
                h[i][i] += c
                h[i][j] -= c
        if max(abs(x) for x in g) < 1e-10:
            break
        # Gaussian elimination on h * step = g (h is positive definite).
        a = [row[:] + [g[i]] for i, row in enumerate(h)]
        for c in range(n):
            piv = a[c][c]
            for r in range(c + 1, n):
                fac = a[r][c] / piv
                for k in range(c, n + 1):
                    a[r][k] -= fac * a[c][k]
        step = [0.0] * n
        for r in range(n - 1, -1, -1):
            step[r] = (a[r][n] - sum(a[r][k] * step[k] for k in range(r + 1, n))) / a[r][r]
        slope = sum(s * x for s, x in zip(step, g))
        if slope < 1e-8:  # quadratic-convergence region: full Newton step, as rust_pairs does
            theta = [th + s for th, s in zip(theta, step)]
            f = objective(theta)
            continue
        t = 1.0
        while True:
            cand = [th + t * s for th, s in zip(theta, step)]
            fc = objective(cand)
            if fc >= f + 1e-4 * t * slope or t < 1e-12:
                theta, f = cand, fc
                break
            t *= 0.5
    # Same quantisation as rust_pairs (round half away from zero), so exact ties stay exact.
    # `+ 0.0`: -0.0 becomes 0.0, as in rust_pairs, so a tie at zero is ordered by index.
    return [math.copysign(math.floor(abs(t) * 1e9 + 0.5), t) / 1e9 + 0.0 for t in theta]


def jpeg_structure(b: bytes) -> None:
    """The same container check as rust_pairs' ``structure`` mode, for JPEG."""
    if len(b) < 4 or b[:2] != b"\xff\xd8":
        raise ValueError("missing JPEG start-of-image marker")
    i, frame = 2, False
    while True:
        while i < len(b) and b[i] != 0xFF:
            i += 1
        while i < len(b) and b[i] == 0xFF:
            i += 1
        if i >= len(b):
            raise ValueError("truncated JPEG: no scan data")
        m = b[i]
        i += 1
        if m == 0xD9:
            raise ValueError("JPEG ends before any scan data")
        if m == 0x01 or 0xD0 <= m <= 0xD7:
            continue
        if i + 2 > len(b):
            raise ValueError("truncated JPEG segment header")
        seg = int.from_bytes(b[i:i + 2], "big")
        if seg < 2 or i + seg > len(b):
            raise ValueError("truncated JPEG segment")
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            h, w = int.from_bytes(b[i + 3:i + 5], "big"), int.from_bytes(b[i + 5:i + 7], "big")
            if not (w and h):
                raise ValueError("JPEG frame has zero size")
            frame = True
        if m == 0xDA:
            if not frame:
                raise ValueError("JPEG scan before any frame header")
            if not b.rstrip(b"\0").endswith(b"\xff\xd9"):
                raise ValueError("truncated JPEG: no end-of-image marker")
            return
        i += seg


def png_structure(b: bytes) -> None:
    """The same container check as rust_pairs' ``structure`` mode, for PNG."""
    import zlib

    if not b.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("missing PNG signature")
    i, idat = 8, False
    while i + 12 <= len(b):
        n = int.from_bytes(b[i:i + 4], "big")
        kind = b[i + 4:i + 8]
        if i + 12 + n > len(b) or zlib.crc32(b[i + 4:i + 8 + n]) != int.from_bytes(b[i + 8 + n:i + 12 + n], "big"):
            raise ValueError("corrupt PNG chunk")
        idat |= kind == b"IDAT"
        if kind == b"IEND":
            if not idat:
                raise ValueError("PNG has no IDAT")
            return
        i += 12 + n
    raise ValueError("truncated PNG")


def check_image(data: bytes, mode: str) -> None:
    if mode == "decode":
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    elif data[:2] == JPEG_MAGIC:
        jpeg_structure(data)
    else:
        png_structure(data)


def build(inputs: list[str], out: str, seed: int = 0, val_fraction: float = 0.05, max_samples: int = 1000, alpha: float = 0.1,
          image_check: str = "structure") -> dict:
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    counts = dict(records_in=0, records_used=0, records_deduplicated=0, records_rejected=0, responses_rejected=0, groups=0, pairs=0)
    rejects = []
    groups: dict[str, dict] = {}
    for path in inputs:
        root = Path(path).parent
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                counts["records_in"] += 1
                try:
                    rec = json.loads(raw)
                    prompt = rec["prompt"].replace("<image>", " ").strip()
                    img_ref = rec["img_path"]
                    comps = rec["completions"]
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    counts["records_rejected"] += 1
                    rejects.append({"file": path, "line": lineno, "reason": f"bad record: {e}"})
                    continue
                responses = []
                for c in comps:
                    scores = {a: rating(c.get("annotations", {}).get(a)) for a in ASPECTS}
                    if not c.get("response", "").strip() or any(v is None for v in scores.values()):
                        counts["responses_rejected"] += 1
                        continue
                    responses.append((c["response"], c.get("model"), scores))
                if not responses:
                    counts["records_rejected"] += 1
                    continue
                ipath = root / img_ref
                try:
                    data = ipath.read_bytes()
                    check_image(data, image_check)
                except Exception as e:  # noqa: BLE001 - any unreadable image is a reject
                    counts["records_rejected"] += 1
                    rejects.append({"file": path, "line": lineno, "reason": f"image: {e}"})
                    continue
                sha = hashlib.sha256(data).hexdigest()
                pnorm = prompt_identity(prompt)
                key = hashlib.sha256(f"{sha}\0{pnorm}".encode()).hexdigest()[:20]
                g = groups.setdefault(key, {"prompt": prompt, "sha": sha, "path": str(ipath), "src": [], "resp": {}, "order": []})
                g["src"].append((path, lineno))
                for text, model, scores in responses:
                    nt = response_identity(text)
                    if nt in g["resp"]:
                        e = g["resp"][nt]
                        for a in ASPECTS:
                            e["sum"][a] += scores[a]
                        e["n"] += 1
                    else:
                        g["resp"][nt] = {"text": text, "model": model, "sum": dict(scores), "n": 1}
                        g["order"].append(nt)
    samples = []
    for key, g in groups.items():
        resp = [g["resp"][k] for k in g["order"]]
        for r in resp:
            r["scores"] = {a: r["sum"][a] / r["n"] for a in sorted(ASPECTS)}
        n = len(resp)
        wins = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                for a in ASPECTS:
                    x, y = resp[i]["scores"][a], resp[j]["scores"][a]
                    if x > y:
                        wins[i][j] += 1
                    elif y > x:
                        wins[j][i] += 1
                    else:
                        wins[i][j] += 0.5
                        wins[j][i] += 0.5
        theta = bt_fit(wins, alpha)
        mean = [sum(r["scores"].values()) / len(ASPECTS) for r in resp]
        pairs = []
        for i in range(n):
            for j in range(i + 1, n):
                if mean[i] == mean[j]:
                    continue
                better = lambda a, b: mean[a] > mean[b] or (mean[a] == mean[b] and (theta[a] > theta[b] or (theta[a] == theta[b] and a < b)))  # noqa: E731
                hi, lo = (j, i) if better(j, i) else (i, j)
                pairs.append((hi, lo))
        if not pairs:
            counts["records_rejected"] += len(g["src"])
            continue
        order = sorted(range(n), key=lambda i: (-theta[i], i))
        pos = {i: p for p, i in enumerate(order)}
        sample = {
            "key": key, "prompt": g["prompt"], "image_sha256": g["sha"],
            "responses": [{"text": resp[i]["text"], "model": resp[i]["model"], "scores": resp[i]["scores"], "strength": theta[i]} for i in order],
            "pairs": sorted(({"chosen": pos[c], "rejected": pos[r], "probability": sigmoid(theta[c] - theta[r]), "margin": mean[c] - mean[r]}
                             for c, r in pairs), key=lambda p: (p["chosen"], p["rejected"])),
            "source": [{"file": f, "line": ln} for f, ln in sorted(g["src"])],
        }
        counts["records_used"] += 1
        counts["records_deduplicated"] += len(g["src"]) - 1
        counts["groups"] += 1
        counts["pairs"] += len(pairs)
        val = val_fraction > 0 and hash64(b"split", g["sha"].encode()) / 2**64 < val_fraction
        samples.append((hash64(b"shuffle", seed.to_bytes(8, "little"), key.encode()), key, val, sample, g["path"]))
    samples.sort(key=lambda s: (s[0], s[1]))
    shards = []
    for split in ("train", "val"):
        chunk = [s for s in samples if s[2] == (split == "val")]
        for k in range(0, len(chunk), max_samples):
            name = f"{split}-{k // max_samples:06d}.tar"
            tmp = outp / f".{name}.partial"
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
                for _, key, _, sample, ipath in chunk[k:k + max_samples]:
                    img = Path(ipath).read_bytes()
                    ext = "jpg" if img[:2] == JPEG_MAGIC else "png"
                    # Shard format 2: the images listed in the JSON, members {key}.{i}.{ext}.
                    sample["images"] = [{"member": f"0.{ext}", "sha256": sample["image_sha256"]}]
                    js = json.dumps(sample, ensure_ascii=False, separators=(",", ":")).encode()
                    for mname, data in ((f"{key}.0.{ext}", img), (f"{key}.json", js)):
                        ti = tarfile.TarInfo(mname)
                        ti.size, ti.mtime, ti.mode = len(data), MTIME, 0o644
                        tf.addfile(ti, io.BytesIO(data))
            os.replace(tmp, outp / name)
            digest = hashlib.sha256((outp / name).read_bytes()).hexdigest()
            shards.append({"path": name, "split": split, "samples": len(chunk[k:k + max_samples]), "sha256": digest})
    manifest = {"counts": counts, "shards": shards}
    (outp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (outp / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
    return manifest


if __name__ == "__main__":
    print(json.dumps(build(sys.argv[2:], sys.argv[1])["counts"]))
