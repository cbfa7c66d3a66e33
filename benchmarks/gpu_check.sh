#!/usr/bin/env bash
# One prepared GPU check (issues 15, 22): everything it measures goes to ONE JSON.
#
#   bash benchmarks/gpu_check.sh [--cpu] [--part N] [JSON]
#
# On the GPU machine (one NVIDIA H200; Python 3.12, torch, transformers, lightning there; no network, no Rust),
# run from the repository root with the wheels of benchmarks/gpu_wheels.sh carried in .whl/:
#   run(command="bash benchmarks/gpu_check.sh --part 1", carry=[".whl"], timeout_s=560)   (then --part 2, ...)
# JSON defaults to $OUT/gpu_check.json ($OUT: the folder that comes back), else /tmp/vpa-gpu-check/gpu_check.json;
# every step's whole log goes beside it (gpu_check.log). The JSON is rewritten after every step, so a run cut
# short still returns what it measured. VPA_CHECK_BUDGET (seconds, default 520, under the issue's 9 minutes)
# bounds the whole check: each step's own limit is cut to what is left, and a step with under 20 s left is
# recorded as skipped. VPA_CHECK_STEPS (a comma list of step names) runs only those; --part N runs part N of
# the three below (one device call each: the check does not fit one 9-minute call). Steps, in order of
# importance (a failing step is recorded and the next one runs):
#   install: the carried wheels into /tmp/site (skipped when .whl/ is absent), the compiled extension beside the sources;
#   part 1 (what issue 22 has never measured):
#   tests: the packed paths' CUDA tests (SDPA mask, FlexAttention, varlen flash against the plain path in bf16);
#      junit XML parsed into the JSON (as for tests_strategies);
#   trainer_mfu: vpa alone at full LLaVA-1.5-7B depth without checkpointing, 8 groups a step (MFU), eager and with
#      --model.compile_layers, then one profiled step each (--profile-last: GPU time by kernel kind, busy share);
#   trainer_nockpt: vpa packed vs TRL without checkpointing on both sides, 8 pairs and 2 groups a step, profiled alike;
#   part 2: trainer_qwen (vpa packed vs TRL at Qwen2-VL-7B, pairs), trainer_fullft (full fine-tuning of the 7B
#      language model, vpa packed vs TRL, pairs), video_dpo (packed vs the pairwise layout at Qwen2-VL-7B, 16
#      frames), varlen_probe (the kernel alone vs SDPA's mask);
#   part 3: trainer_full (vpa packed vs TRL at full depth with checkpointing, 16 pairs and 4 groups: GPU run 4's
#      rows again), tests_strategies (bf16, FSDP and DeepSpeed ZeRO-2/3 on one GPU with LoRA and full fine-tuning,
#      Kornia on CUDA), augment (Kornia on CUDA vs torchvision on CPU), seva_generation.
# --cpu: the same steps at a tiny shape on CPU (the smoke test of this script, tests/test_gpu_check.py).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CPU=0
JSON=""
PART=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    --part) PART="${2:-}"; shift ;;
    --part=*) PART="${1#--part=}" ;;
    *) JSON="$1" ;;
  esac
  shift
done
case "$PART" in
  "") ;;
  1) VPA_CHECK_STEPS="${VPA_CHECK_STEPS:-tests,trainer_mfu,trainer_nockpt}" ;;
  2) VPA_CHECK_STEPS="${VPA_CHECK_STEPS:-trainer_qwen,trainer_fullft,video_dpo,varlen_probe}" ;;
  3) VPA_CHECK_STEPS="${VPA_CHECK_STEPS:-trainer_full,tests_strategies,augment,seva_generation}" ;;
  *) echo "gpu_check.sh: --part must be 1, 2 or 3, not '$PART'" >&2; exit 2 ;;
esac
WORK="$(mktemp -d /tmp/vpa-gpu-check.XXXXXX)"
if [ -z "$JSON" ]; then JSON="${OUT:-/tmp/vpa-gpu-check}/gpu_check.json"; fi
mkdir -p "$(dirname "$JSON")"
LOG="${JSON%.json}.log"
: > "$LOG"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
STEPS="$WORK/steps.jsonl"
: > "$STEPS"
echo '{}' > "$WORK/env.json"
DEADLINE=$(( $(date +%s) + ${VPA_CHECK_BUDGET:-520} ))

report() {  # (re)write the one JSON: environment + every step so far (junit XML of the tests summarised)
  "$PY" - "$WORK/env.json" "$STEPS" "$JSON" "$CPU" "$WORK" <<'PYEOF'
import json, os, sys
import xml.etree.ElementTree as ET
env, steps, out, cpu = json.load(open(sys.argv[1])), [json.loads(l) for l in open(sys.argv[2])], sys.argv[3], sys.argv[4] == "1"
for s in steps:
    if s["step"].startswith("tests") and not s.get("skipped"):  # a pytest step: its junit XML is WORK/<step>.xml
        s.pop("result_error", None)
        try:
            root = ET.parse(os.path.join(sys.argv[5], s["step"] + ".xml")).getroot()
        except Exception as exc:
            s["result"] = {"error": f"no junit XML: {exc}"}
            continue
        cases = []
        for case in root.iter("testcase"):
            status = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    status = child.tag if child.tag != "skipped" else "skipped: " + (child.get("message") or "")[:200]
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status, "seconds": float(case.get("time", 0))})
        s["result"] = {"passed": sum(c["status"] == "passed" for c in cases),
                       "failed": sum(c["status"] in ("failure", "error") for c in cases),
                       "skipped": sum(c["status"].startswith("skipped") for c in cases), "cases": cases}
report = {"mode": "cpu-smoke" if cpu else "gpu", "environment": env, "steps": steps,
          "ok": bool(steps) and all(s["exit_code"] == 0 for s in steps)}
with open(out + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
os.replace(out + ".tmp", out)
print(f"wrote {out}: " + ", ".join(f"{s['step']} rc={s['exit_code']} {s['seconds']}s" for s in steps))
sys.exit(0 if report["ok"] else 1)
PYEOF
}

step() {  # step NAME TIMEOUT_S RESULT_FILE -- command...
  local name="$1" limit="$2" result="$3"; shift 4
  local t0 rc left
  # install always runs: every part needs the carried wheels
  if [ "$name" != install ] && [ -n "${VPA_CHECK_STEPS:-}" ] && [[ ",$VPA_CHECK_STEPS," != *",$name,"* ]]; then return; fi
  left=$(( DEADLINE - $(date +%s) - 5 ))
  if [ "$left" -lt "$limit" ]; then limit="$left"; fi
  t0=$(date +%s.%N)
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped, ${left}s of the check's budget left"
    echo "{\"step\": \"$name\", \"exit_code\": 124, \"timed_out\": true, \"skipped\": true, \"seconds\": 0, \"result\": null}" >> "$STEPS"
    report > /dev/null
    return
  fi
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  tail -n 15 "$WORK/$name.log"
  cat "$WORK/$name.log" >> "$LOG"
  "$PY" - "$name" "$rc" "$t0" "$result" "$WORK/$name.log" >> "$STEPS" <<'PYEOF'
import json, sys, time
name, rc, t0, result, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
entry = {"step": name, "exit_code": rc, "timed_out": rc in (124, 137), "seconds": round(time.time() - t0, 1)}
try:
    entry["result"] = json.load(open(result)) if result != "-" else None
except (OSError, ValueError) as exc:
    entry["result"] = None
    entry["result_error"] = str(exc)
if rc != 0:
    entry["log_tail"] = open(log, errors="replace").read()[-3000:]
print(json.dumps(entry))
PYEOF
  report > /dev/null
}

# 1. wheels
WHEELS="${VPA_WHEELS:-$ROOT/.whl}"
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  step install 60 - -- bash -c "
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site '$WHEELS'/*.whl &&
    cp /tmp/site/vpa_lightning/*.so '$ROOT/vpa_lightning/'"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "== install: no wheels in $WHEELS, using the installed packages"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# environment
"$PY" - > "$WORK/env.json" <<'PYEOF'
import json, os, platform, importlib.metadata as md
import torch
out = {"python": platform.python_version(), "cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()}
if torch.cuda.is_available():
    out["cuda_runtime"] = torch.version.cuda
    out["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
for name in ("torch", "transformers", "lightning", "peft", "accelerate", "trl", "datasets", "pyarrow", "deepspeed",
             "kornia", "webdataset", "jsonargparse", "vpa"):
    try:
        out[name] = md.version(name)
    except md.PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
PYEOF
cat "$WORK/env.json" | tee -a "$LOG"

if [ "$CPU" = 1 ]; then
  # tiny shapes: the script's plumbing, end to end, in well under a minute on CPU
  L="${VPA_CHECK_CPU_LIMIT:-300}"  # per step; generous: CI machines are shared
  DEADLINE=$(( $(date +%s) + ${VPA_CHECK_BUDGET:-1500} ))
  step tests "$L" "$WORK/tests.xml" -- "$PY" -m pytest -q -p no:cacheprovider --junitxml="$WORK/tests.xml" \
    tests/models/test_packed.py tests/models/test_varlen.py -k "segment_mask or first_fit or layout_offsets or flash_call"
  step trainer_vs_trl "$L" "$WORK/trl.json" -- "$PY" benchmarks/trainer_vs_trl.py --device cpu --settings pairwise \
    --vpa-modes packed --gradient-checkpointing --steps 1 --warmup 1 --repeats 1 --pairs-per-step 2 --image-size 28 \
    --max-length 128 --phases --profile --json "$WORK/trl.json"
  step trainer_qwen "$L" "$WORK/trl_qwen.json" -- "$PY" benchmarks/trainer_vs_trl.py --device cpu --settings groups \
    --vpa-modes packed,packed+compile --steps 1 --warmup 1 --repeats 1 --groups-per-step 1 --image-size 56 --max-length 128 \
    --shape qwen2vl-small --skip-trl --profile-last --json "$WORK/trl_qwen.json"
  step augment "$L" "$WORK/augment.json" -- "$PY" benchmarks/augment_throughput.py --batch-size 4 --size 56 --warmup 0 \
    --repeats 1 --json "$WORK/augment.json"
  step seva_generation "$L" "$WORK/seva.json" -- "$PY" benchmarks/seva_generation.py --model tiny:llava --prompts 4 \
    --batch-size 4 --max-new-tokens 4 --size 56 --device cpu --workdir "$WORK/seva" --json "$WORK/seva.json"
  step video_dpo "$L" "$WORK/video.json" -- "$PY" benchmarks/video_dpo.py --device cpu --frames 4 --size 56 \
    --settings groups --modes packed,pairwise --steps 1 --warmup 0 --repeats 1 --json "$WORK/video.json"
else
  # pytest-xdist (in the GPU image) runs the CUDA tests 6 at a time; each `vpa fit` is its own process group
  # pytest-timeout (there too): a test that hangs fails alone, and the junit XML is still written
  XDIST=()
  if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 6); fi
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then XDIST+=(--timeout 100); fi
  # part 1. the packed paths' CUDA tests (SDPA mask, FlexAttention, varlen flash against the plain path in bf16)
  step tests 90 "$WORK/tests.xml" -- "$PY" -m pytest -q -p no:cacheprovider --junitxml="$WORK/tests.xml" -rs \
    "${XDIST[@]}" -k "gpu or cuda" tests/models/test_packed.py tests/models/test_varlen.py
  # full depth, LLaVA-1.5-7B (24 CLIP layers, 32 Vicuna layers, bf16 weights), vpa packed (varlen flash attention)
  FULL=(--device cuda --image-size 336 --precision bf16-mixed --vpa-modes packed --steps 4 --warmup 2 --repeats 1
        --timeout 150 --max-length 1024 --phases)
  LLAVA7B=(--shape llava7b --model-dir "$WORK/llava7b")  # built once per call, shared by the LLaVA-7B steps
  # without checkpointing: 8 groups (about 7k tokens a forward) for vpa's MFU, eager and with --model.compile_layers
  # (the first step compiles: warm-up); TRL's 96 sequences would not fit. One more step runs under the profiler:
  # where the GPU time goes (GEMM, attention, the rest) and how busy it was
  step trainer_mfu 220 "$WORK/trl_mfu.json" -- "$PY" benchmarks/trainer_vs_trl.py "${FULL[@]}" "${LLAVA7B[@]}" \
    --settings groups --groups-per-step 8 --skip-trl --profile-last --vpa-modes packed,packed+compile --timeout 200 \
    --json "$WORK/trl_mfu.json"
  # the issue's no-checkpointing rows: both sides without it, at batches TRL can hold (16 and 24 sequences)
  step trainer_nockpt 240 "$WORK/trl_nockpt.json" -- "$PY" benchmarks/trainer_vs_trl.py "${FULL[@]}" "${LLAVA7B[@]}" \
    --settings pairwise,groups --pairs-per-step 8 --groups-per-step 2 --profile-last --json "$WORK/trl_nockpt.json"
  # part 2. Qwen2-VL-7B (M-RoPE, grouped-query heads), pairs, checkpointing on both sides
  step trainer_qwen 130 "$WORK/trl_qwen.json" -- "$PY" benchmarks/trainer_vs_trl.py "${FULL[@]}" --shape qwen2vl7b \
    --gradient-checkpointing --settings pairwise --pairs-per-step 8 --json "$WORK/trl_qwen.json"
  # full fine-tuning of the 7B language model (bf16 weights, torch AdamW, the reference a frozen copy), pairs
  step trainer_fullft 130 "$WORK/trl_fullft.json" -- "$PY" benchmarks/trainer_vs_trl.py "${FULL[@]}" "${LLAVA7B[@]}" \
    --gradient-checkpointing --settings pairwise --pairs-per-step 8 --full-finetune --json "$WORK/trl_fullft.json"
  # video DPO (issue 25) at Qwen2-VL-7B, 16 frames of 224 px: packed vs the pairwise layout, groups then pairs
  step video_dpo 150 "$WORK/video.json" -- "$PY" benchmarks/video_dpo.py --device cuda --shape qwen2vl7b --frames 16 \
    --size 224 --settings groups,pairs --modes packed,pairwise --steps 3 --warmup 1 --repeats 1 --checkpointing \
    --timeout 100 --json "$WORK/video.json"
  step varlen_probe 60 "$WORK/varlen_probe.json" -- "$PY" benchmarks/varlen_probe.py --json "$WORK/varlen_probe.json"
  # part 3. GPU run 4's rows again: checkpointing on both sides, 16 pairs and 4 four-response groups (24 pairs)
  step trainer_full 240 "$WORK/trl_full.json" -- "$PY" benchmarks/trainer_vs_trl.py "${FULL[@]}" "${LLAVA7B[@]}" \
    --gradient-checkpointing --settings pairwise,groups --pairs-per-step 16 --groups-per-step 4 \
    --json "$WORK/trl_full.json"
  # the strategies' CUDA tests (bf16, FSDP and DeepSpeed ZeRO-2/3 with LoRA and full fine-tuning; GPU run 4 passed
  # them) and Kornia on CUDA
  step tests_strategies 120 "$WORK/tests_strategies.xml" -- "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$WORK/tests_strategies.xml" -rs "${XDIST[@]}" -k "gpu or cuda" tests/trainer/test_strategies.py \
    tests/augment/test_augmentations.py
  step augment 40 "$WORK/augment.json" -- "$PY" benchmarks/augment_throughput.py --batch-size 64 --size 336 \
    --warmup 2 --repeats 5 --json "$WORK/augment.json"
  step seva_generation 45 "$WORK/seva.json" -- "$PY" benchmarks/seva_generation.py --model tiny:llava?image_size=336 \
    --dtype bfloat16 --prompts 256 --batch-size 64 --max-new-tokens 32 --size 336 --workdir "$WORK/seva" \
    --json "$WORK/seva.json"
fi

report
rc=$?
rm -rf "$WORK"
exit $rc
