#!/usr/bin/env bash
# CI's lanes: the suite inside the kernels it does not run on, each booted under QEMU by
# `trackcheck vm` (through ci/lane.sh): the full matrix and self-test on Debian 6.12 and 7.2
# for x86_64 (AMD SVM + NPT) and arm64, and a subset on 6.1 for both.
#
# Two streams run side by side, because this machine has two cores; x86_64 lanes use one
# each (QEMU's single-threaded TCG; see suites/src/vm/qemu.rs for why it must be), arm64
# lanes up to two. Each lane's whole output goes to trackcheck-out/lanes/<lane>.log and its
# reports to trackcheck-out/lanes/<lane>/; this prints each lane's summary as it ends, then
# a table of lane times.
#
#   ci/lanes.sh                  # CI's lanes
#   ci/lanes.sh x86_64-7.2 6.1   # lanes named exactly so, or whose arch or kernel is given
#   ci/lanes.sh all              # every lane (today the same as CI's)
#   TRACKCHECK_LANE_ARGS=--bless ci/lanes.sh 7.2   # re-record lanes' golden files (review them!)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=trackcheck-out/lanes
mkdir -p "$OUT"

# The 6.1 subset: the families that carry the harvest contract for every mechanism (stepped
# rounds, the collect/rearm/copy races, the ring-full path, random concurrent writers, a
# memslot's log flag toggled while vCPUs write); the rest runs on 6.12 and 7.2.
SUBSET="run stepped ::race:: ring-full concurrent-random-v2 memslot-toggle"

# name arch kernel [-- trackcheck args], per stream; each stream pairs an x86_64 lane (one
# core) with an arm64 one (two), so the two streams load the machine alike. Stream B's first
# lane also cross-builds trackcheck for arm64 (about 330 s from a clean target), so it takes
# the shorter arm64 lane: measured on a clean clone, x86_64-7.2 ~1005 s, aarch64-6.12 ~930 s,
# x86_64-6.12 ~905 s, aarch64-7.2 ~755 s, the 6.1 subsets 25-75 s.
STREAM_A=(
  "x86_64-7.2 x86_64 debian:7.2"
  "aarch64-6.12 aarch64 debian:6.12"
  "x86_64-6.1 x86_64 debian:6.1 -- $SUBSET"
)
STREAM_B=(
  "aarch64-7.2 aarch64 debian:7.2"
  "x86_64-6.12 x86_64 debian:6.12"
  "aarch64-6.1 aarch64 debian:6.1 -- $SUBSET"
)
NOT_IN_CI=()

FILTERS=("$@")
ALL=0
[ ${#FILTERS[@]} -gt 0 ] && [ "${FILTERS[0]}" = all ] && { ALL=1; FILTERS=(); }
wanted() {
  local name=$1 arch=${1%%-*} kernel=${1#*-}
  [ ${#FILTERS[@]} -gt 0 ] || return 0
  for w in "${FILTERS[@]}"; do
    [[ $w == "$name" || $w == "$arch" || $w == "$kernel" ]] && return 0
  done
  return 1
}

# stream LANE...: run lanes one after another; record "name status seconds" in $OUT/status.
stream() {
  for spec in "$@"; do
    read -r name arch kernel rest <<<"$spec"
    wanted "$name" || continue
    local start=$SECONDS
    # shellcheck disable=SC2086
    ci/lane.sh "$arch" "$kernel" --out "$OUT/$name" ${TRACKCHECK_LANE_ARGS:-} $rest > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $((SECONDS - start))" >> "$OUT/status"
    {
      printf '\n== lane %s: exit %s after %s s\n' "$name" "$rc" "$((SECONDS - start))"
      grep -E '^trackcheck vm: (kernel|modules|build|reports|time|[a-z0-9]+: exit)|trials in [0-9.]+s \(|^trackcheck vm:   \| (FAIL|NEW|UNEXPECTED|drop-page|self-test)|^trackcheck vm: [^ ]' "$OUT/$name.log" \
        | grep -v -e '^trackcheck vm: boot:' -e '::inject-' | tail -40
      [ "$rc" = 0 ] || { echo "-- last lines of $OUT/$name.log:"; tail -30 "$OUT/$name.log"; }
    } | flock "$OUT/.print" cat
  done
}

rm -f "$OUT/status"
touch "$OUT/status"
A=("${STREAM_A[@]}")
B=("${STREAM_B[@]}")
if [ ${#NOT_IN_CI[@]} -gt 0 ] && { [ $ALL = 1 ] || [ ${#FILTERS[@]} -gt 0 ]; }; then A+=("${NOT_IN_CI[@]}"); fi
stream "${A[@]}" &
a=$!
stream "${B[@]}" &
b=$!
wait $a $b

echo
echo "== lanes"
status=0
while read -r name rc secs; do
  printf '%-14s %-8s %6s s\n' "$name" "$([ "$rc" = 0 ] && echo ok || echo "FAIL($rc)")" "$secs"
  [ "$rc" = 0 ] || status=1
done < "$OUT/status"
[ -s "$OUT/status" ] || { echo "no lane matched: $*" >&2; status=2; }
exit $status
