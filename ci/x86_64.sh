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
  step "cargo nextest run --release"
  cargo nextest run --release --config-file ci/nextest.toml
else
  step "cargo nextest: not installed here, skipped (cargo install cargo-nextest to run it)"
fi
