#!/usr/bin/env bash
# A short libFuzzer run of every cargo-fuzz target in rust_pairs/fuzz (issue 13: the VLFeedback
# fast path and the full parser must agree on every input). Part of scripts/test.sh, so CI runs it.
#   VPA_FUZZ_SECONDS  seconds per target (default 30); 0 skips the run.
# The machine has one stable toolchain and no nightly can be fetched; cargo-fuzz passes -Z flags,
# which stable rustc takes with RUSTC_BOOTSTRAP=1. No sanitizer: outside its tests the crate's only
# unsafe code is FFI calls into getrusage and mimalloc's options, so what the fuzzer hunts is a panic
# (debug assertions are on), and an ASan build would double the build time.
set -euo pipefail
seconds="${VPA_FUZZ_SECONDS:-30}"
[ "$seconds" = 0 ] && { echo "fuzz: skipped (VPA_FUZZ_SECONDS=0)"; exit 0; }
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="$root/target/tools"
if ! [ -x "$tools/bin/cargo-fuzz" ]; then
    cargo install --locked --quiet --root "$tools" cargo-fuzz --version 0.13.2
fi
export PATH="$tools/bin:$PATH" RUSTC_BOOTSTRAP=1
cd "$root/rust_pairs"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo fuzz list); do
    # New inputs go to a scratch corpus; the committed seeds are read only.
    mkdir -p "$scratch/$target"
    echo "fuzz: $target for ${seconds}s"
    if ! cargo fuzz run "$target" --sanitizer none "$scratch/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" >"$scratch/$target.log" 2>&1; then
        tail -n 60 "$scratch/$target.log"
        echo "fuzz: $target FAILED (the input is under rust_pairs/fuzz/artifacts/$target)"
        exit 1
    fi
    grep -E "^Done [0-9]+ runs" "$scratch/$target.log"
done
