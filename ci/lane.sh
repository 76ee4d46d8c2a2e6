#!/usr/bin/env bash
# One lane: installs what is missing (QEMU; for aarch64 Debian's cross toolchain), builds
# trackcheck for the lane's architecture, and runs `trackcheck vm` (download the kernel into
# the cache, build the initramfs, boot, run the matrix and the self-test inside, judge them
# against golden/matrix/<host key>@<series>.snap).
#
#   ci/lane.sh x86_64 debian:7.2                       # the x86 TDP lane on Debian 7.2
#   ci/lane.sh aarch64 debian:6.12 --bless             # ... arm64, writing its golden file back
#   ci/lane.sh x86_64 debian:6.1 -- run stepped race   # a subset: `trackcheck run ARGS` inside
#   ci/lane.sh x86_64 /path/bzImage --modules DIR      # your own kernel
#
# Everything after the kernel goes to `trackcheck vm` (see `trackcheck vm --help`).
# Exit status: that of `trackcheck vm` (0 when every trial matched its golden file and every
# injected loss was caught).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ $# -ge 2 ] || { sed -n '2,14p' "$0"; exit 2; }
ARCH=$1; KERNEL=$2; shift 2

have_pkg() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
install() {
  local need=()
  for p in "$@"; do have_pkg "$p" || need+=("$p"); done
  [ ${#need[@]} -gt 0 ] || return 0
  [ "$(id -u)" = 0 ] || { echo "lane: missing packages ${need[*]}; run as root once, or apt-get install them" >&2; exit 1; }
  echo "lane: installing ${need[*]}"
  if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

# The host's trackcheck runs `vm`; the x86_64 lane runs the same binary inside.
cargo build --release --locked -q -p trackcheck-suites --bin trackcheck
host_bin=$ROOT/target/release/trackcheck
case "$ARCH" in
  x86_64)
    install qemu-system-x86
    bin=$host_bin
    ;;
  aarch64|arm64)
    ARCH=aarch64
    if ! grep -qx arm64 <(dpkg --print-foreign-architectures); then
      [ "$(id -u)" = 0 ] || { echo "lane: run as root once to add the arm64 architecture (dpkg --add-architecture arm64)" >&2; exit 1; }
      dpkg --add-architecture arm64
      apt-get update -qq
    fi
    install rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu \
            binutils-aarch64-linux-gnu libc6-dev-arm64-cross qemu-system-arm
    # Cross-built with Debian's rustc-web (it has the aarch64 standard library), static, so
    # the initramfs needs no libraries.
    target=aarch64-unknown-linux-gnu
    tdir=$ROOT/target/arm64-lane
    RUSTC=/usr/bin/rustc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_TARGET_DIR=$tdir \
    TRACKCHECK_GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
      /usr/bin/cargo build -q --release --locked --target $target -p trackcheck-suites --bin trackcheck
    bin=$tdir/trackcheck-stripped
    aarch64-linux-gnu-strip -o "$bin" "$tdir/$target/release/trackcheck"
    ;;
  *) echo "lane: unknown architecture '$ARCH': x86_64 or aarch64" >&2; exit 2 ;;
esac
exec "$host_bin" vm --arch "$ARCH" --kernel "$KERNEL" --binary "$bin" "$@"
