#!/usr/bin/env bash
# Fuzzes the parsers of untrusted and hand-written input with cargo-fuzz
# (libFuzzer): signature headers, subject tokens, field extraction, the
# host config, handler manifests. Targets are in fuzz/fuzz_targets/, their
# seeds (values from the tests) in fuzz/seeds/<target>/; what a run finds
# new goes to fuzz/corpus/<target>/ (not committed), a crash to
# fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh                 # every target, 20 s each (the short run)
#   scripts/fuzz.sh 300             # every target, 5 minutes each
#   scripts/fuzz.sh 300 token       # one target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`, installed here when
# missing). libFuzzer needs unstable compiler flags: on a stable toolchain
# RUSTC_BOOTSTRAP=1 allows them. No sanitizer: the code fuzzed is safe
# Rust, so what is looked for is panics, failed assertions, hangs and
# runaway memory, which libFuzzer reports by itself (`-rss_limit_mb`,
# `-timeout`).
set -euo pipefail

cd "$(dirname "$0")/.."
seconds="${1:-20}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(signature_headers token extract config manifest)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1 CARGO_INCREMENTAL=0
flags=(--sanitizer none --fuzz-dir fuzz)
cargo fuzz build "${flags[@]}"
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  echo "== $target: ${seconds}s" >&2
  cargo fuzz run "${flags[@]}" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1
done
