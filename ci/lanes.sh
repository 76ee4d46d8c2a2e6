#!/usr/bin/env bash
# CI's lanes: the suite inside the kernels it does not run on, each booted under QEMU by
# `trackcheck vm` (through ci/lane.sh): the full matrix and self-test on Debian 6.12 and 7.2
# for x86_64 (AMD SVM + NPT) and arm64, and a subset on 6.1.
#
# Two streams run side by side, because this machine has two cores: the x86_64 lanes (QEMU's
# single-threaded TCG, one core; see suites/src/vm/qemu.rs for why it must be single-threaded)
# and the arm64 lanes (multi-threaded TCG). Each lane's whole output goes to
# trackcheck-out/lanes/<lane>.log and its reports to trackcheck-out/lanes/<lane>/; this prints
# each lane's summary as it ends, then a table of lane times.
#
#   ci/lanes.sh              # every lane
#   ci/lanes.sh x86_64-7.2   # only the lanes whose name contains one of the arguments
#   TRACKCHECK_LANE_ARGS=--bless ci/lanes.sh   # re-record every lane's golden file (review it!)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=trackcheck-out/lanes
mkdir -p "$OUT"

# The 6.1 subset: the families that carry the harvest contract for every mechanism (stepped
# rounds, the collect/rearm/copy races, the ring-full path, random concurrent writers, a
# memslot's log flag toggled while vCPUs write); the rest runs on 6.12 and 7.2.
SUBSET=(run stepped ::race:: ring-full concurrent-random-v2 memslot-toggle)

# name arch kernel [-- trackcheck args]
X86=(
  "x86_64-7.2 x86_64 debian:7.2"
  "x86_64-6.12 x86_64 debian:6.12"
  "x86_64-6.1 x86_64 debian:6.1 -- ${SUBSET[*]}"
)
ARM=(
  "aarch64-7.2 aarch64 debian:7.2"
  "aarch64-6.12 aarch64 debian:6.12"
  "aarch64-6.1 aarch64 debian:6.1 -- ${SUBSET[*]}"
)

FILTERS=("$@")
wanted() {
  [ ${#FILTERS[@]} -gt 0 ] || return 0
  for w in "${FILTERS[@]}"; do [[ $1 == *"$w"* ]] && return 0; done
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
stream "${X86[@]}" &
x86=$!
stream "${ARM[@]}" &
arm=$!
wait $x86 $arm

echo
echo "== lanes"
status=0
while read -r name rc secs; do
  printf '%-14s %-5s %6s s\n' "$name" "$([ "$rc" = 0 ] && echo ok || echo "FAIL($rc)")" "$secs"
  [ "$rc" = 0 ] || status=1
done < "$OUT/status"
[ -s "$OUT/status" ] || { echo "no lane matched: ${*}" >&2; status=2; }
exit $status
