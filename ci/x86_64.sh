#!/usr/bin/env bash
# x86_64 lane: formatting, lints, and the test suite (KVM trials included where /dev/kvm works;
# they skip with the reason where it does not).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "rustfmt"
cargo fmt --all -- --check

step "clippy"
cargo clippy --all-targets --release -- -D warnings

step "cargo test --release (the README's test command)"
cargo test --release

if cargo nextest --version >/dev/null 2>&1; then
  # cargo test has just run the conformance matrix and the self-test in full: nextest runs
  # every other test, and of those two binaries one family (stepped), which is enough to show
  # their libtest-mimic trials list, filter and run under nextest, without a second full matrix.
  step "cargo nextest run --release (conformance and selftest: the stepped family)"
  cargo nextest run --release --config-file ci/nextest.toml \
    -E 'not (binary(conformance) | binary(selftest)) | test(/::stepped::/)'
else
  step "cargo nextest: not installed here, skipped (cargo install cargo-nextest to run it)"
fi
