#!/usr/bin/env bash
# Prepare the wheels benchmarks/gpu_check.sh installs on the GPU machine (Python 3.12, x86-64, no network there):
#   bash benchmarks/gpu_wheels.sh [DIR]        # default DIR: .whl in the repository root (git-ignored)
# The project's extension is built here as one abi3 wheel (pyo3 abi3-py310: loads on CPython >= 3.10), the
# pure/binary dependencies the GPU image lacks are downloaded for cp312 manylinux x86_64, and DeepSpeed is
# built from its sdist as a pure wheel (DS_BUILD_OPS=0: its CUDA ops are JIT-compiled there if ever needed).
# Versions default to the ones installed here, so both machines run the same code.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"

version() {  # installed version of a distribution, or empty
  "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}
pinned() {  # NAME==the version installed here, or a GPU pin below, or NAME
  local v; v="${GPU_PINS[$1]:-$(version "$1")}"; if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi; }
# Where the version tested here needs more than the GPU image has: transformers 5.25 needs huggingface_hub >= 2.4
# (the image has 1.33), whose own chain (httpx2, a newer click) would have to travel too; 5.24 runs on the image's
# hub and was run there (gpu_check_h200_run2.json). Override with GPU_PIN_TRANSFORMERS=VERSION (empty: as here).
declare -A GPU_PINS=([transformers]="${GPU_PIN_TRANSFORMERS-5.24.0}")

# missing from the GPU image (see the device notes' package list), and transformers + peft (+ regex, which that
# transformers needs newer) at the versions tested here, so the GPU runs the code CI tests (torch, accelerate,
# lightning, torchmetrics, tokenizers, safetensors are the image's own)
PACKAGES=(kornia kornia_rs webdataset braceexpand jsonargparse docstring-parser typeshed-client trl datasets dill
          multiprocess hjson pydantic pydantic-core annotated-types typing-inspection transformers peft regex)
SPECS=()
for p in "${PACKAGES[@]}"; do SPECS+=("$(pinned "$p")"); done
echo "downloading: ${SPECS[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$DEST" "${SPECS[@]}"

# DeepSpeed: sdist only on PyPI; a pure wheel without prebuilt ops
DS="${DEEPSPEED_SPEC:-$(pinned deepspeed)}"
if ! ls "$DEST"/deepspeed-*.whl >/dev/null 2>&1; then
  TMP="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$TMP" "$DS"
  DS_BUILD_OPS=0 DS_BUILD_AIO=0 DS_BUILD_GDS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$TMP"/deepspeed-*
  rm -rf "$TMP"
fi

# the project itself, abi3 (rust_pairs.abi3.so inside vpa_lightning/)
rm -f "$DEST"/vpa-*.whl
# touch: a CARGO_TARGET_DIR shared between checkouts may hold another checkout's build of the same crate
touch "$ROOT/rust_pairs/src/python.rs"
(cd "$ROOT" && maturin build --release --quiet -o "$DEST")
ls -la "$DEST"
du -sh "$DEST"
