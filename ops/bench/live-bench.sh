#!/usr/bin/env bash
# live-bench.sh — full against incremental backup of a running VM's disk, same disk, same run.
#
# Usage: ops/bench/live-bench.sh
#
# Builds a realistic 4096 MiB VM disk with make-vm-disk (or uses $IMAGE, a raw image), converts
# it to qcow2, and runs `cargo run --release -p cairn-worker --example live_bench` on it: a
# qemu-storage-daemon serves the disk as a running VM; cairn's qemu adapter takes a full backup
# (QMP snapshot, NBD transfer, release); the guest overwrites $CHURN_PERCENT% of the disk in
# scattered 64 KiB random blocks through NBD; cairn takes an incremental backup through the
# dirty bitmap; the incremental is restored and compared with the disk at its snapshot.
# Prints a markdown table on stdout.
#
# Environment (defaults in brackets):
#   BENCH_SIZE_MIB  size of the VM disk [4096]
#   BENCH_DIR       work dir [a new mktemp dir under /var/tmp]; removed at the end unless KEEP=1
#   IMAGE           use this raw image instead of building one
#   MAKE_VM_DISK    path of make-vm-disk [ops/vmdisk's, built in release mode]
#   CHURN_PERCENT   percent of the disk the guest overwrites [1]
#   CHURN_SEED      seed of the guest's writes [1]
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
size=${BENCH_SIZE_MIB:-4096}
work=${BENCH_DIR:-$(mktemp -d /var/tmp/cairn-live-bench.XXXXXX)}
mkdir -p "$work"
[[ ${KEEP:-0} == 1 ]] || trap 'rm -rf "$work"' EXIT
# shellcheck source=ops/bench/vmdisk.sh
source "$repo/ops/bench/vmdisk.sh"
vmdisk_tools "$repo"
raw=${IMAGE:-}
if [[ -z $raw ]]; then
  raw=$work/disk.raw
  echo "building a ${size} MiB VM disk with $MAKE_VM_DISK" >&2
  "$MAKE_VM_DISK" "$raw" "$size" >&2
fi
qemu-img convert -f raw -O qcow2 "$raw" "$work/disk.qcow2"
[[ -n ${IMAGE:-} ]] || rm -f "$raw"
cd "$repo"
cargo run --quiet --release -p cairn-worker --example live_bench -- \
  "$work/disk.qcow2" "${CHURN_PERCENT:-1}" "${CHURN_SEED:-1}"
