#!/usr/bin/env bash
# arm64 lane: cross-builds trackcheck for aarch64 (static, Debian's rustc-web toolchain), boots
# Debian's arm64 6.12 kernel under qemu-system-aarch64 with virtualization=on (an emulated arm64
# host whose /dev/kvm works), runs the arm64 conformance matrix and the oracle's self-tests
# inside in one boot, brings the reports back out over the serial console and judges them
# against golden/matrix/<arm64 host key>@<kernel series>.snap.
#
#   ci/arm64-lane.sh                 # install what is missing, build, boot, run, judge
#   ci/arm64-lane.sh --bless         # ... and write the arm64 golden matrix back (review it!)
#   ci/arm64-lane.sh -- ARGS...      # run `trackcheck ARGS...` inside instead of the lane's runs
#
# Environment: TRACKCHECK_ARM64_CACHE (downloads, default /var/cache/trackcheck-arm64),
# TRACKCHECK_ARM64_OUT (reports, default trackcheck-out/arm64), TRACKCHECK_ARM64_TIMEOUT
# (seconds the guest may run, default 1200), TRACKCHECK_ARM64_SMP / _MEM (default 2 / 3072).
# Exit status: 0 when every trial matched the golden file and every injected loss was caught.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${TRACKCHECK_ARM64_CACHE:-/var/cache/trackcheck-arm64}
OUT=${TRACKCHECK_ARM64_OUT:-$ROOT/trackcheck-out/arm64}
TIMEOUT=${TRACKCHECK_ARM64_TIMEOUT:-1200}
SMP=${TRACKCHECK_ARM64_SMP:-2}
MEM=${TRACKCHECK_ARM64_MEM:-3072}
TARGET=aarch64-unknown-linux-gnu
TARGET_DIR=$ROOT/target/arm64-lane

BLESS=0
CUSTOM=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bless) BLESS=1 ;;
    --) shift; CUSTOM=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "arm64-lane: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

now() { date +%s.%N; }
declare -a PHASES=()
phase_start=$(now)
lane_start=$phase_start
step() { printf '\n== arm64 lane: %s\n' "$*"; }
phase_end() {
  local t; t=$(now)
  PHASES+=("$(printf '%-8s %7.1f s' "$1" "$(echo "$t - $phase_start" | bc)")")
  phase_start=$t
}
times_report() {
  PHASES+=("$(printf '%-8s %7.1f s' total "$(echo "$(now) - $lane_start" | bc)")")
  mkdir -p "$OUT"
  printf '%s\n' "${PHASES[@]}" | tee "$OUT/lane-times.txt"
}

# ---------------------------------------------------------------- install
step "install (only what is missing)"
need_pkgs=()
have_pkg() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
for p in rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu \
         binutils-aarch64-linux-gnu libc6-dev-arm64-cross qemu-system-arm cpio bc; do
  have_pkg "$p" || need_pkgs+=("$p")
done
if ! grep -qx arm64 <(dpkg --print-foreign-architectures); then
  [ "$(id -u)" = 0 ] || { echo "arm64-lane: run as root once to add the arm64 architecture (dpkg --add-architecture arm64)" >&2; exit 1; }
  dpkg --add-architecture arm64
  apt-get update -qq
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "arm64-lane: missing packages ${need_pkgs[*]}; run as root once, or apt-get install them" >&2; exit 1; }
  echo "installing: ${need_pkgs[*]}"
  if ! apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  fi
else
  echo "toolchain, cross binutils and qemu: present"
fi
mkdir -p "$CACHE"
# The newest Debian arm64 6.12 kernel (not -rt, not -cloud: the generic one has KVM built in).
kdir=$CACHE/kernel
if [ ! -f "$kdir/vmlinuz" ]; then
  pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb[0-9]+-arm64-unsigned$' \
        | awk '{print $1}' | sort -V | tail -1)
  [ -n "$pkg" ] || { apt-get update -qq; pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb[0-9]+-arm64-unsigned$' | awk '{print $1}' | sort -V | tail -1); }
  [ -n "$pkg" ] || { echo "arm64-lane: no linux-image-6.12.*-arm64-unsigned package in the apt lists" >&2; exit 1; }
  echo "kernel package: $pkg"
  rm -rf "$kdir.tmp" && mkdir -p "$kdir.tmp"
  (cd "$kdir.tmp" && apt-get download -qq "$pkg:arm64" && dpkg -x ./*.deb x)
  cp "$kdir.tmp"/x/boot/vmlinuz-* "$kdir.tmp/vmlinuz"
  echo "$pkg" > "$kdir.tmp/package"
  rm -rf "$kdir.tmp/x" "$kdir.tmp"/*.deb
  rm -rf "$kdir" && mv "$kdir.tmp" "$kdir"
fi
echo "kernel: $(cat "$kdir/package")"
bbdir=$CACHE/busybox
if [ ! -x "$bbdir/busybox" ]; then
  rm -rf "$bbdir.tmp" && mkdir -p "$bbdir.tmp"
  (cd "$bbdir.tmp" && apt-get download -qq busybox-static:arm64 && dpkg -x ./*.deb x)
  cp "$bbdir.tmp/x/bin/busybox" "$bbdir.tmp/busybox"
  rm -rf "$bbdir.tmp/x" "$bbdir.tmp"/*.deb
  rm -rf "$bbdir" && mv "$bbdir.tmp" "$bbdir"
fi
phase_end install

# ---------------------------------------------------------------- build
step "cross-build trackcheck for $TARGET (static)"
RUSTC=/usr/bin/rustc \
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
RUSTFLAGS="-C target-feature=+crt-static" \
CARGO_TARGET_DIR=$TARGET_DIR \
TRACKCHECK_GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
  /usr/bin/cargo build --release --locked --target $TARGET -p trackcheck-suites --bin trackcheck
bin=$TARGET_DIR/$TARGET/release/trackcheck

step "initramfs"
ird=$TARGET_DIR/initramfs
rm -rf "$ird" && mkdir -p "$ird"/{bin,dev,proc,sys,tmp,run,lane/golden}
cp "$bbdir/busybox" "$ird/bin/busybox"
aarch64-linux-gnu-strip -o "$ird/bin/trackcheck" "$bin"
cp -r golden/matrix golden/proptest-regressions "$ird/lane/golden/"
if [ ${#CUSTOM[@]} -gt 0 ]; then
  printf 'run custom trackcheck' > "$ird/lane/commands"
  for a in "${CUSTOM[@]}"; do printf " '%s'" "${a//\'/\'\\\'\'}" >> "$ird/lane/commands"; done
  echo >> "$ird/lane/commands"
else
  cat > "$ird/lane/commands" <<'EOF'
trackcheck env --json > /lane/out/env.json
run env trackcheck env
run matrix trackcheck run --golden /lane/golden/matrix --out /lane/out/matrix --format text ${BLESS:+--bless}
run selftest trackcheck run --selftest --out /lane/out/selftest --format text
EOF
fi
echo "BLESS=$([ $BLESS = 1 ] && echo 1)" > "$ird/lane/settings"
cat > "$ird/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; mount -t tmpfs run /run
export PATH=/bin TRACKCHECK_GOLDEN=/lane/golden/matrix HOME=/tmp
. /lane/settings
mkdir -p /lane/out
echo "=== lane: booted $(uname -r), $(nproc) CPUs, $(grep MemTotal /proc/meminfo), uptime $(cut -d' ' -f1 /proc/uptime) s"
# run NAME CMD...: stdout+stderr to the console and /lane/out/NAME.log, status to /lane/out/NAME.rc
run() {
  name=$1; shift
  start=$(date +%s)
  echo "=== lane: $name: $*"
  { "$@" 2>&1; echo $? > /lane/out/$name.rc; } | tee /lane/out/$name.log
  echo "=== lane: $name: exit $(cat /lane/out/$name.rc) after $(( $(date +%s) - start )) s"
}
. /lane/commands
if [ -n "$BLESS" ]; then cp -r /lane/golden/matrix /lane/out/golden; fi
dmesg > /lane/out/dmesg.txt
echo "=== TRACKCHECK-OUT BEGIN"
tar -C /lane -czf - out | base64
echo "=== TRACKCHECK-OUT END"
poweroff -f
EOF
chmod +x "$ird/init"
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1 > "$TARGET_DIR/initramfs.cpio.gz")
ls -la "$TARGET_DIR/initramfs.cpio.gz"
phase_end build

# ---------------------------------------------------------------- boot + run
step "boot $(cat "$kdir/package") under qemu-system-aarch64 (virtualization=on, $SMP CPUs, $MEM MiB) and run"
rm -rf "$OUT" && mkdir -p "$OUT"
console=$OUT/console.log
set +e
timeout --foreground -k 10 "$TIMEOUT" qemu-system-aarch64 \
  -M virt,virtualization=on,gic-version=3 -cpu max,pauth-impdef=on -smp "$SMP" -m "$MEM" \
  -nographic -nodefaults -serial stdio -no-reboot \
  -kernel "$kdir/vmlinuz" -initrd "$TARGET_DIR/initramfs.cpio.gz" \
  -append "console=ttyAMA0 rdinit=/init panic=-1 quiet transparent_hugepage=always" \
  < /dev/null 2>&1 | tr -d '\r' | tee "$console" | sed -u '/^=== TRACKCHECK-OUT BEGIN/,/^=== TRACKCHECK-OUT END/d'
qemu_rc=${PIPESTATUS[0]}
set -e
# Split the qemu phase at the guest's "booted" line: its uptime is the boot (kernel start to
# init), the rest is the trials.
boot_s=$(sed -n 's/^=== lane: booted .*uptime \([0-9.]*\) s$/\1/p' "$console" | head -1)
if [ -n "$boot_s" ]; then
  t=$(now)
  PHASES+=("$(printf '%-8s %7.1f s' boot "$boot_s")")
  PHASES+=("$(printf '%-8s %7.1f s' run "$(echo "$t - $phase_start - $boot_s" | bc)")")
  phase_start=$t
else
  phase_end boot+run
fi

# ---------------------------------------------------------------- judge
step "reports"
if ! grep -q '^=== TRACKCHECK-OUT END' "$console"; then
  times_report
  echo "arm64-lane: the guest did not finish (qemu exit $qemu_rc; 124 = the ${TIMEOUT}s limit); console log: $console" >&2
  exit 1
fi
sed -n '/^=== TRACKCHECK-OUT BEGIN/,/^=== TRACKCHECK-OUT END/p' "$console" | sed '1d;$d' | base64 -d | tar -C "$OUT" -xzf -
mv "$OUT/out"/* "$OUT/" && rmdir "$OUT/out"
ls "$OUT" "$OUT"/matrix "$OUT"/selftest 2>/dev/null || true
if [ $BLESS = 1 ] && [ -d "$OUT/golden" ]; then
  for f in "$OUT"/golden/aarch64-*@*.snap; do cp "$f" golden/matrix/ && echo "blessed: golden/matrix/$(basename "$f")"; done
fi
status=0
for rc in "$OUT"/*.rc; do
  n=$(basename "$rc" .rc)
  echo "$n: exit $(cat "$rc")"
  [ "$(cat "$rc")" = 0 ] || status=1
done
times_report
exit $status
