#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the package (building the Rust extension in
# place) with its training and test extras, then runs the Rust tests, a short fuzz run
# (scripts/fuzz.sh) and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[train,test]"
cargo test --workspace --quiet
bash scripts/fuzz.sh
python -m pytest -q "$@"
