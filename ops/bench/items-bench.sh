#!/usr/bin/env bash
# items-bench.sh — time to first byte of a single-file item recovery from a 4 GiB recovery point.
#
# Usage: ops/bench/items-bench.sh
#
# Builds a 4096 MiB VM disk with make-vm-disk (GPT, FAT ESP, ext4 root, swap), backs it up into
# a fresh repository, then times, each from a warm page cache and in the same run:
#   item      `cairn repo extract --item /p2/etc/hosts` (opens the repository, reads the index
#             chain, the partition table and the ext4 metadata it needs, writes the file): the
#             time to the first (and only) byte of the recovered file;
#   item-big  the same for the largest file in /p2/usr/lib/x86_64-linux-gnu (to its last byte);
#   item-cold `item` after dropping the page cache (when /proc/sys/vm/drop_caches is writable);
#   restore   the baseline without random access: a full `cairn repo restore` of the recovery
#             point, then `debugfs -R 'dump /etc/hosts'` on its ext4 partition;
#   cp        the floor of any copy: `cp --sparse=always` of the raw image.
# Every timed step ends with `sync -f`. Prints a markdown table on stdout.
#
# Environment: BENCH_SIZE_MIB [4096], BENCH_DIR [mktemp under /var/tmp], KEEP [0],
#   CAIRN [target/release/cairn], MAKE_VM_DISK [ops/vmdisk's make-vm-disk], RUNS [3].
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/../.." && pwd)
BENCH_SIZE_MIB=${BENCH_SIZE_MIB:-4096}
RUNS=${RUNS:-3}
KEEP=${KEEP:-0}
CAIRN=${CAIRN:-${CARGO_TARGET_DIR:-$repo_root/target}/release/cairn}
# shellcheck source=ops/bench/vmdisk.sh
source "$script_dir/vmdisk.sh"
vmdisk_tools "$repo_root"
[ -x "$CAIRN" ] || { echo "items-bench: build first: cargo build --release -p cairn" >&2; exit 2; }
BENCH_DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/items-bench.XXXXXX)}
[ "$KEEP" = 1 ] || trap 'rm -rf "$BENCH_DIR"' EXIT
cd "$BENCH_DIR"

log() { echo "items-bench: $*" >&2; }
now() { date +%s.%N; }
# timed NAME CMD...: runs CMD, then sync -f, prints wall seconds
timed() {
  local t0 t1
  t0=$(now)
  "$@" >/dev/null
  sync -f .
  t1=$(now)
  echo "$t1 - $t0" | bc -l
}

log "building a ${BENCH_SIZE_MIB} MiB VM disk"
"$MAKE_VM_DISK" disk.raw "$BENCH_SIZE_MIB" >&2
"$CAIRN" repo init repo >/dev/null
log "backing it up"
"$CAIRN" repo backup repo --source disk.raw --disk vm0 >/dev/null
rp=$("$CAIRN" repo list repo --disk vm0 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["recovery_points"][-1]["rp"])')
read -r big big_size < <("$CAIRN" repo browse repo --disk vm0 --path /p2/usr/lib/x86_64-linux-gnu --json | python3 -c '
import json, sys
entries = [e for e in json.load(sys.stdin)["entries"] if e["kind"] == "file"]
best = max(entries, key=lambda e: e["size"])
print(best["name"], best["size"])')
start=$(sgdisk -i 2 disk.raw | sed -n 's/^First sector: \([0-9]*\).*/\1/p')
count=$(( $(sgdisk -i 2 disk.raw | sed -n 's/^Last sector: \([0-9]*\).*/\1/p') - start + 1 ))

item() { rm -rf out && "$CAIRN" repo extract repo --disk vm0 --rp "$rp" --item /p2/etc/hosts --to out && cmp -s out/hosts <(printf '127.0.0.1 localhost\n'); }
item_big() { rm -rf outbig && "$CAIRN" repo extract repo --disk vm0 --rp "$rp" --item "/p2/usr/lib/x86_64-linux-gnu/$big" --to outbig && [ "$(stat -c %s "outbig/$big")" = "$big_size" ]; }
cold=0
if (echo 1 >/proc/sys/vm/drop_caches) 2>/dev/null; then cold=1; fi
# The cache is dropped (after a sync) before the clock starts: only the extraction is timed.
item_cold() { item; }
restore_dump() {
  rm -f restored.raw part.img hosts
  "$CAIRN" repo restore repo --disk vm0 --rp "$rp" --to restored.raw
  dd if=restored.raw of=part.img bs=512 skip="$start" count="$count" conv=sparse status=none
  debugfs -R "dump /etc/hosts hosts" part.img 2>/dev/null
  cmp -s hosts <(printf '127.0.0.1 localhost\n')
}
copy_raw() { rm -f copy.raw && cp --sparse=always disk.raw copy.raw; }

declare -A results
for run in $(seq 1 "$RUNS"); do
  steps="item item_big restore_dump copy_raw"
  [ "$cold" = 1 ] && steps="item_cold $steps"
  for step in $steps; do
    if [ "$step" = item_cold ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi
    results[$step,$run]=$(timed $step) || { log "$step failed"; exit 1; }
    log "run $run: $step ${results[$step,$run]} s"
  done
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
row() {
  local vals=() r
  for r in $(seq 1 "$RUNS"); do vals+=("${results[$1,$r]}"); done
  printf '%s' "$(median "${vals[@]}")"
}
item_s=$(row item); big_s=$(row item_big); restore_s=$(row restore_dump); cp_s=$(row copy_raw)
echo "| step (median of $RUNS, wall s) | seconds | vs item |"
echo "|---|---:|---:|"
printf '| item: /etc/hosts out of the RP (time to first byte) | %.3f | 1.0× |\n' "$item_s"
printf '| item: %s (%s bytes, to its last byte) | %.3f | %.1f× |\n' "$big" "$big_size" "$big_s" "$(echo "$big_s / $item_s" | bc -l)"
if [ "$cold" = 1 ]; then
  cold_s=$(row item_cold)
  printf '| item: /etc/hosts, page cache dropped first | %.3f | %.1f× |\n' "$cold_s" "$(echo "$cold_s / $item_s" | bc -l)"
fi
printf '| baseline: full restore + debugfs dump | %.3f | %.1f× |\n' "$restore_s" "$(echo "$restore_s / $item_s" | bc -l)"
printf '| baseline: cp --sparse of the raw image | %.3f | %.1f× |\n' "$cp_s" "$(echo "$cp_s / $item_s" | bc -l)"
if (( $(echo "$item_s <= 0.5" | bc -l) )); then echo "goal ≤ 0.5 s: PASS"; else echo "goal ≤ 0.5 s: FAIL"; fi
