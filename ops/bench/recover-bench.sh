#!/usr/bin/env bash
# recover-bench.sh — recovery of a 4 GiB VM disk through `cairn up`, against `cp` of the raw
# image in the same run, and a recovery over the original VM after 1% churn (delta restore)
# against the full recovery.
#
# Usage: ops/bench/recover-bench.sh [--build] [--help]
#
# Steps: build a realistic raw VM disk with make-vm-disk; describe it as VM "bench"; start
# `cairn up` (release build) on a free port; back the VM up (not timed); then, each timed from
# a warm page cache to a final `sync -f`:
#   1. cp          `cp IMAGE copy.raw` (the baseline: GNU cp skips holes, like the restore)
#   2. full        `cairn recover bench --rp RP --folder DIR --wait` (new raw image), checked
#                  byte-identical with cmp
#   3. churn-disk IMAGE 1 (1% of the disk in 64 KiB random writes), then a backup (not timed)
#   4. delta       `cairn recover bench --rp RP --to-original --wait`: the VM's disk (unchanged
#                  since its last backup, so cairn knows what it holds) goes back to the first
#                  recovery point, writing only the chunks that differ; checked with cmp
#   5. churn-disk IMAGE 1 with another seed, not backed up (not timed)
#   6. delta, unknown changes: the same recovery; now the disk must be read and compared
#   7. the data path alone, without the job machinery: `cairn repo restore` of the first
#      recovery point to a new file, then `cairn repo restore --delta` of the second recovery
#      point onto it (stamped by the first, so not read)
# Results go to stdout as markdown and to $OUT.
#
# Environment (defaults in brackets):
#   BENCH_SIZE_MIB  size of the VM disk [4096]
#   BENCH_DIR       work dir [a new mktemp dir under /var/tmp]; removed unless KEEP=1
#   KEEP            1 keeps the work dir [0]
#   OUT             results file [ops/bench/recover-results.md]
#   MAKE_VM_DISK, CHURN_DISK  the disk builder and churn tool [ops/vmdisk's, built in release mode]
#   CAIRN           cairn binary [target/release/cairn, or under $CARGO_TARGET_DIR]
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/../.." && pwd)
force_build=0
for arg in "$@"; do
  case $arg in
    --build) force_build=1 ;;
    -h | --help) sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "recover-bench: unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done
BENCH_SIZE_MIB=${BENCH_SIZE_MIB:-4096}
KEEP=${KEEP:-0}
OUT=${OUT:-$repo_root/ops/bench/recover-results.md}
cargo_target=${CARGO_TARGET_DIR:-$repo_root/target}
CAIRN=${CAIRN:-$cargo_target/release/cairn}
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'recover-bench: ERROR: %s\n' "$*" >&2; exit 1; }
# shellcheck source=ops/bench/vmdisk.sh
source "$repo_root/ops/bench/vmdisk.sh"
vmdisk_tools "$repo_root" || die "cannot build the disk tools (ops/vmdisk)"
if ((force_build)) || [[ ! -x $CAIRN ]]; then
  log "building cairn (release)"
  (cd "$repo_root" && cargo build --release -p cairn >&2)
fi

work=${BENCH_DIR:-$(mktemp -d /var/tmp/cairn-recover-bench.XXXXXX)}
mkdir -p "$work"
server_pid=
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  ((KEEP)) || rm -rf "$work"
}
trap cleanup EXIT

image=$work/bench-disk0.raw
log "building a ${BENCH_SIZE_MIB} MiB VM disk"
"$MAKE_VM_DISK" "$image" "$BENCH_SIZE_MIB" >/dev/null
allocated_mib=$(( $(stat -c %b "$image") * $(stat -c %B "$image") / 1048576 ))
mkdir -p "$work/data/vms"
cat >"$work/data/vms/bench.json" <<JSON
{"name": "bench", "uuid": "0b5e7c1a-2d3f-4a5b-8c6d-7e8f9a0b1c2d",
 "disks": [{"id": "disk0", "path": "$image", "format": "raw"}]}
JSON
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
server=http://127.0.0.1:$port
"$CAIRN" up --data-dir "$work/data" --listen "127.0.0.1:$port" >"$work/up.out" 2>"$work/up.log" &
server_pid=$!
for _ in $(seq 600); do
  grep -q "cairn is up" "$work/up.out" 2>/dev/null && break
  sleep 0.1
done
grep -q "cairn is up" "$work/up.out" || die "cairn up did not start: $(cat "$work/up.log")"
export CAIRN_SERVER=$server
for _ in $(seq 600); do
  "$CAIRN" vm list --json | grep -q '"bench"' && break
  sleep 0.1
done
log "backing the VM up"
"$CAIRN" backup bench --wait >/dev/null
rp=$("$CAIRN" rp list bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["rp"])')

now() { date +%s.%N; }
timed() { # NAME CMD... → seconds on stdout
  local start end
  sync -f "$work"
  start=$(now)
  "$@" >/dev/null
  sync -f "$work"
  end=$(now)
  python3 -c "print(f'{$end - $start:.2f}')"
}

log "cp of the raw image"
t_cp=$(timed cp "$image" "$work/copy.raw")
rm -f "$work/copy.raw"
log "full recovery to a folder"
t_full=$(timed "$CAIRN" recover bench --rp "$rp" --folder "$work/full" --wait)
cmp "$image" "$work/full/bench-disk0.raw" || die "the full recovery differs from the image"
last_written() {
  local job
  job=$("$CAIRN" jobs --json --limit 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["job"])')
  "$CAIRN" job show "$job" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["recovery"]["bytes_written"])'
}
log "1% churn, then a backup"
churn_bytes=$("$CHURN_DISK" "$image" 1 1 | awk '{s += $2} END {print s}')
cmp -s "$image" "$work/full/bench-disk0.raw" && die "churn changed nothing"
"$CAIRN" backup bench --wait >/dev/null
log "recovery over the original VM (delta, known content)"
t_delta=$(timed "$CAIRN" recover bench --rp "$rp" --to-original --wait)
cmp "$image" "$work/full/bench-disk0.raw" || die "the delta recovery is not the recovery point"
delta_written=$(last_written)
log "1% churn, not backed up"
"$CHURN_DISK" "$image" 1 2 >/dev/null
log "recovery over the original VM (delta, unknown changes)"
t_read=$(timed "$CAIRN" recover bench --rp "$rp" --to-original --wait)
cmp "$image" "$work/full/bench-disk0.raw" || die "the delta recovery is not the recovery point"
read_written=$(last_written)

log "data path: repo restore full, then delta onto it"
vm_id=$("$CAIRN" vm list --json | python3 -c 'import json,sys; print([v["vm"] for v in json.load(sys.stdin) if v["name"] == "bench"][0])')
rps=$("$CAIRN" rp list bench --json | python3 -c 'import json,sys; l=json.load(sys.stdin); print(l[0]["rp"], l[1]["rp"])')
read -r rp1 rp2 <<<"$rps"
t_repo_full=$(timed "$CAIRN" repo restore "$work/data/repo" --disk "$vm_id.disk0" --rp "$rp1" --to "$work/repo-full.raw")
t_repo_delta=$(timed "$CAIRN" repo restore "$work/data/repo" --disk "$vm_id.disk0" --rp "$rp2" --to "$work/repo-full.raw" --delta)

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
verdict() { python3 -c "print('PASS' if $1 >= $2 else 'FAIL')"; }
r_cp=$(ratio "$t_full" "$t_cp")
r_delta=$(ratio "$t_full" "$t_delta")
r_read=$(ratio "$t_full" "$t_read")
r_repo=$(ratio "$t_repo_full" "$t_repo_delta")
{
  echo "# cairn recovery benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(git -C "$repo_root" rev-parse --short HEAD))"
  echo
  echo "Image: ${BENCH_SIZE_MIB} MiB raw disk from make-vm-disk, ${allocated_mib} MiB allocated; churn: ${churn_bytes} bytes."
  echo
  echo "| operation | seconds | ratio |"
  echo "|---|---:|---|"
  echo "| cp of the raw image (baseline) | $t_cp | 1 |"
  echo "| full recovery to a folder (\`cairn recover --folder --wait\`) | $t_full | ${r_cp}× cp |"
  echo "| recovery over the original VM after 1% churn, backed up (delta, known content; ${delta_written} bytes written) | $t_delta | full / delta = ${r_delta}× (goal ≥ 10×: $(verdict "$r_delta" 10)) |"
  echo "| recovery over the original VM after 1% churn, not backed up (delta, disk read and compared; ${read_written} bytes written) | $t_read | full / delta = ${r_read}× |"
  echo "| data path: \`cairn repo restore\` full | $t_repo_full | |"
  echo "| data path: \`cairn repo restore --delta\` of the churned point onto it (known content) | $t_repo_delta | full / delta = ${r_repo}× (goal ≥ 10×: $(verdict "$r_repo" 10)) |"
  echo
  echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
} | tee "$OUT"
