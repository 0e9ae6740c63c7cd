#!/usr/bin/env bash
# repo-bench.sh — reproducible benchmark of cairn's repository against borg 1.2 and restic 0.14.
#
# Usage: ops/bench/repo-bench.sh [--build] [--help]
#
# One run builds a realistic raw VM disk with make-vm-disk, then for each tool in $TOOLS:
# starts from a sparse copy of the pristine image, takes a full backup, applies the same
# churn-disk writes (same percent and seed, so the same bytes), takes an incremental backup,
# restores the latest backup and checks that the restore is byte-identical to the churned image.
# Every step is timed with /usr/bin/time (wall seconds, peak RSS, CPU seconds) from a warm page cache, and
# the timed step includes a final `sync -f` of the work dir's filesystem, so that every tool is
# measured to the point where its output is durable (borg and restic do not fsync a restore).
# The results are printed as markdown on stdout and written to $OUT; progress goes to stderr.
#
# Flags:
#   --build   build cairn (cargo build --release -p cairn) even if target/release/cairn exists
#
# Environment (defaults in brackets):
#   TOOLS           tools to run, in order ["borg restic cairn"]
#   BENCH_SIZE_MIB  size of the VM disk [4096]; 512 or 1024 make a quick smoke run
#   BENCH_DIR       work dir [a new mktemp dir under /var/tmp]; removed at the end unless KEEP=1
#   KEEP            1 keeps the work dir (images, repositories, logs) [0]
#   OUT             results file [ops/bench/results.md in this repository]
#   IMAGE           use this existing raw image as the pristine disk instead of building one
#   VM_DISK_SOURCE  directory make-vm-disk fills the root filesystem from [its default, /usr/lib]
#   MAKE_VM_DISK    path of make-vm-disk [ops/vmdisk's, built in release mode]
#   CHURN_DISK      path of churn-disk [ops/vmdisk's, built in release mode]
#   CHURN_PERCENT   percent of the image churn-disk overwrites [1]
#   CHURN_SEED      churn-disk seed [1]
#   CAIRN           cairn binary [target/release/cairn in this repository, or under $CARGO_TARGET_DIR]
#   CAIRN_INIT_ARGS extra arguments for `cairn repo init` [none: the repository defaults]
#   BORG_EXTRACT_ARGS extra arguments for `borg extract` [--sparse: holes for all-zero chunks]
#   SYNC_AFTER      1 includes a `sync -f` in every timed step [1]
#   NO_INSTALL      1 never runs apt-get; missing tools are an error [0]
#   STRICT          1 exits with status 3 when a goal FAILs [0]
#
# Examples:
#   BENCH_SIZE_MIB=512 TOOLS="borg restic" ops/bench/repo-bench.sh      # quick smoke run
#   ops/bench/repo-bench.sh --build                                      # the full benchmark
#   KEEP=1 BENCH_DIR=/var/tmp/rb ops/bench/repo-bench.sh                 # keep everything
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/../.." && pwd)

force_build=0
for arg in "$@"; do
  case $arg in
    --build) force_build=1 ;;
    -h | --help) sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "repo-bench: unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

TOOLS=${TOOLS:-borg restic cairn}
BENCH_SIZE_MIB=${BENCH_SIZE_MIB:-4096}
KEEP=${KEEP:-0}
OUT=${OUT:-$repo_root/ops/bench/results.md}
CHURN_PERCENT=${CHURN_PERCENT:-1}
CHURN_SEED=${CHURN_SEED:-1}
cargo_target=${CARGO_TARGET_DIR:-$repo_root/target}
CAIRN=${CAIRN:-$cargo_target/release/cairn}
CAIRN_INIT_ARGS=${CAIRN_INIT_ARGS:-}
BORG_EXTRACT_ARGS=${BORG_EXTRACT_ARGS---sparse}
SYNC_AFTER=${SYNC_AFTER:-1}
NO_INSTALL=${NO_INSTALL:-0}
STRICT=${STRICT:-0}
DISK_ID=bench-disk

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'repo-bench: ERROR: %s\n' "$*" >&2; exit 1; }
has_tool() { [[ " $TOOLS " == *" $1 "* ]]; }

for tool in $TOOLS; do
  case $tool in borg | restic | cairn) ;; *) die "unknown tool in TOOLS: $tool (borg, restic, cairn)" ;; esac
done
[[ $BENCH_SIZE_MIB =~ ^[0-9]+$ ]] || die "BENCH_SIZE_MIB must be a number of MiB, not '$BENCH_SIZE_MIB'"

# The disk builder and churn tool are the repository's own (ops/vmdisk).
# shellcheck source=ops/bench/vmdisk.sh
source "$repo_root/ops/bench/vmdisk.sh"
vmdisk_tools "$repo_root" || die "cannot build the disk tools (ops/vmdisk)"

# --- 1. tools --------------------------------------------------------------------------------
declare -A pkg_of=(
  [borg]=borgbackup [restic]=restic [sgdisk]=gdisk [mkfs.ext4]=e2fsprogs [mkfs.vfat]=dosfstools
  [mcopy]=mtools [mkswap]=util-linux [python3]=python3 [cmp]=diffutils [/usr/bin/time]=time
)
needed=(python3 cmp /usr/bin/time)
[[ -z ${IMAGE:-} ]] && needed+=(sgdisk mkfs.ext4 mkfs.vfat mcopy mkswap)
has_tool borg && needed+=(borg)
has_tool restic && needed+=(restic)
missing_pkgs=()
for cmd in "${needed[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing_pkgs+=("${pkg_of[$cmd]}")
done
if ((${#missing_pkgs[@]})); then
  [[ $NO_INSTALL == 1 ]] && die "missing packages: ${missing_pkgs[*]} (NO_INSTALL=1)"
  ((EUID == 0)) || die "missing packages: ${missing_pkgs[*]}; run as root or install them"
  log "installing ${missing_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${missing_pkgs[@]}" >&2
fi

borg_version=n/a restic_version=n/a cairn_version=n/a
if has_tool borg; then
  borg_version=$(borg --version | awk '{print $2}')
  [[ $borg_version == 1.2.* ]] || log "WARNING: expected borg 1.2.x, found $borg_version"
  log "borg $borg_version"
fi
if has_tool restic; then
  restic_version=$(restic version | awk '{print $2}')
  [[ $restic_version == 0.14.* ]] || log "WARNING: expected restic 0.14.x, found $restic_version"
  log "restic $restic_version"
fi
if has_tool cairn; then
  if [[ $force_build == 1 || ! -x $CAIRN ]]; then
    log "building cairn (cargo build --release -p cairn)"
    (cd "$repo_root" && cargo build --release -p cairn >&2)
    CAIRN=$cargo_target/release/cairn
  fi
  [[ -x $CAIRN ]] || die "no cairn binary at $CAIRN"
  cairn_version=$("$CAIRN" --version 2>/dev/null | head -n1 | sed 's/^cairn //' || true)
  commit=$(git -C "$repo_root" rev-parse --short HEAD 2>/dev/null || true)
  cairn_version="${cairn_version:-(no --version)}${commit:+ (commit $commit$(git -C "$repo_root" diff --quiet HEAD 2>/dev/null || echo ', dirty tree'))}"
  log "cairn: $cairn_version"
fi

# --- 2. work dir and the pristine image ------------------------------------------------------
if [[ -n ${BENCH_DIR:-} ]]; then
  if [[ -d $BENCH_DIR && -n $(ls -A "$BENCH_DIR") && ! -e $BENCH_DIR/.repo-bench ]]; then
    die "BENCH_DIR=$BENCH_DIR is not empty and was not made by repo-bench; refusing to use (and later delete) it"
  fi
  mkdir -p "$BENCH_DIR"
  work=$(cd "$BENCH_DIR" && pwd)
else
  work=$(mktemp -d /var/tmp/cairn-repo-bench.XXXXXX)
fi
touch "$work/.repo-bench"
cleanup() {
  local status=$?
  if [[ $KEEP == 1 ]]; then
    log "kept the work dir: $work"
  elif [[ -e $work/.repo-bench ]]; then
    rm -rf "$work"
  fi
  exit "$status"
}
trap cleanup EXIT
logs=$work/logs
mkdir -p "$logs"
log "work dir: $work"

# Keep the tools' caches and config inside the work dir so that no earlier run leaks in.
export BORG_BASE_DIR=$work/borg-home
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export RESTIC_CACHE_DIR=$work/restic-cache RESTIC_PASSWORD=bench

pristine=$work/pristine.raw
make_vm_disk_secs=
if [[ -n ${IMAGE:-} ]]; then
  [[ -f $IMAGE ]] || die "IMAGE=$IMAGE does not exist"
  log "using the given image $IMAGE"
  cp --sparse=always "$IMAGE" "$pristine"
  image_origin="given as IMAGE=$IMAGE"
else
  log "building a ${BENCH_SIZE_MIB} MiB VM disk with $MAKE_VM_DISK "
  start=$(date +%s.%N)
  # Its scratch files go beside the image, in the work dir, not to a small /tmp.
  "$MAKE_VM_DISK" "$pristine" "$BENCH_SIZE_MIB" ${VM_DISK_SOURCE:+--source "$VM_DISK_SOURCE"} >&2
  make_vm_disk_secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')
  image_origin="built by make-vm-disk from ${VM_DISK_SOURCE:-/usr/lib} in ${make_vm_disk_secs} s"
fi
image_bytes=$(stat -c %s "$pristine")
image_alloc_bytes=$(($(stat -c %b "$pristine") * $(stat -c %B "$pristine")))
log "image: $image_bytes bytes, $image_alloc_bytes allocated"

# --- 3. measuring ----------------------------------------------------------------------------
declare -A secs=() rss=() cpu=() load=() repo_full=() repo_growth=() note=()
churn_ref=

# measure KEY DIR CMD...: runs CMD in DIR under /usr/bin/time (plus a sync when SYNC_AFTER=1),
# records secs[KEY], rss[KEY], cpu[KEY] (user+sys seconds) and load[KEY] (1-minute load average
# just before the step, as other work on the machine skews wall times); output goes to $logs/KEY.{out,err}. A failure stops the run.
measure() {
  local key=$1 dir=$2
  shift 2
  sync
  load[$key]=$(cut -d' ' -f1 /proc/loadavg)
  log "$key: $* (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  local -a wrapped=("$@")
  if [[ $SYNC_AFTER == 1 ]]; then
    # shellcheck disable=SC2016 # expanded by the inner bash
    wrapped=(bash -c '"$@" && exec sync -f "$BENCH_SYNC_PATH"' "$key" "$@")
  fi
  if ! (cd "$dir" && BENCH_SYNC_PATH=$work /usr/bin/time -f '%e %M %U %S' -o "$logs/$key.time" \
    "${wrapped[@]}" >"$logs/$key.out" 2>"$logs/$key.err"); then
    printf '\nrepo-bench: FAILED: %s: %s\n--- stdout (tail) ---\n' "$key" "$*" >&2
    tail -n 20 "$logs/$key.out" >&2 || true
    printf -- '--- stderr (tail) ---\n' >&2
    tail -n 40 "$logs/$key.err" >&2 || true
    exit 1
  fi
  # /usr/bin/time writes "Command exited with non-zero status" lines only on failure; the
  # measurement is the last line.
  local user_s sys_s
  read -r "secs[$key]" "rss[$key]" user_s sys_s < <(tail -n1 "$logs/$key.time")
  cpu[$key]=$(awk -v u="$user_s" -v s="$sys_s" 'BEGIN{printf "%.2f", u+s}')
  log "$key: ${secs[$key]} s, peak RSS ${rss[$key]} KiB, CPU ${cpu[$key]} s"
}

# fresh_image TOOL: the tool's working copy of the pristine image, in the page cache.
fresh_image() {
  local img=$work/$1/img/disk.raw
  mkdir -p "$(dirname "$img")"
  cp --sparse=always "$pristine" "$img"
  sync
  cat "$img" >/dev/null
  printf '%s\n' "$img"
}

# churn TOOL IMG: the same churn-disk writes for every tool; checks they are the same.
churn() {
  local tool=$1 img=$2 ranges=$work/$1/churn-ranges.txt
  log "$tool: churn-disk $CHURN_PERCENT% seed $CHURN_SEED"
  "$CHURN_DISK" "$img" "$CHURN_PERCENT" "$CHURN_SEED" >"$ranges"
  if [[ -z $churn_ref ]]; then
    churn_ref=$work/churn-ranges.txt
    cp "$ranges" "$churn_ref"
  elif ! cmp -s "$churn_ref" "$ranges"; then
    die "churn-disk wrote different ranges for $tool than before ($churn_ref vs $ranges)"
  fi
  sync
  cat "$img" >/dev/null
}

repo_bytes() { du -sb "$1" | cut -f1; }

# check_restore TOOL RESTORED IMG: the restore must be byte-identical to the churned image.
check_restore() {
  local tool=$1 restored=$2 img=$3
  [[ -f $restored ]] || die "$tool: restore produced no file at $restored"
  if ! cmp "$restored" "$img" >&2; then
    die "$tool: the restored image differs from the churned image ($restored vs $img)"
  fi
  log "$tool: restore is byte-identical to the churned image"
}

# drop_outputs TOOL: frees the disk space of a finished tool (unless KEEP=1).
drop_outputs() { [[ $KEEP == 1 ]] || rm -rf "${work:?}/$1"; }

run_borg() {
  local base=$work/borg repo img
  img=$(fresh_image borg)
  repo=$base/repo
  measure borg_init "$base" borg init -e none "$repo"
  cat "$img" >/dev/null
  measure borg_full "$base/img" borg create --compression zstd,3 "$repo::full" disk.raw
  repo_full[borg]=$(repo_bytes "$repo")
  churn borg "$img"
  measure borg_incr "$base/img" borg create --compression zstd,3 "$repo::incr" disk.raw
  repo_growth[borg]=$(($(repo_bytes "$repo") - repo_full[borg]))
  mkdir -p "$base/restore"
  # shellcheck disable=SC2086 # BORG_EXTRACT_ARGS is a list of flags
  measure borg_restore "$base/restore" borg extract $BORG_EXTRACT_ARGS "$repo::incr"
  check_restore borg "$base/restore/disk.raw" "$img"
  note[borg]="\`borg init -e none\`, \`borg create --compression zstd,3\` (default buzhash chunker), \`borg extract ${BORG_EXTRACT_ARGS}\`"
  drop_outputs borg
}

run_restic() {
  local base=$work/restic repo img restored
  img=$(fresh_image restic)
  repo=$base/repo
  measure restic_init "$base" restic -r "$repo" init --repository-version 2
  cat "$img" >/dev/null
  measure restic_full "$base/img" restic -r "$repo" backup disk.raw
  repo_full[restic]=$(repo_bytes "$repo")
  churn restic "$img"
  measure restic_incr "$base/img" restic -r "$repo" backup disk.raw
  repo_growth[restic]=$(($(repo_bytes "$repo") - repo_full[restic]))
  mkdir -p "$base/restore"
  measure restic_restore "$base" restic -r "$repo" restore latest --target "$base/restore"
  restored=$(find "$base/restore" -type f -name disk.raw | head -n1)
  check_restore restic "$restored" "$img"
  note[restic]="\`restic init --repository-version 2\` (always encrypted, compression auto), \`restic backup\` (the incremental uses the parent snapshot and the file cache), \`restic restore latest\` (no sparse restore in 0.14)"
  drop_outputs restic
}

# json_field FILE FIELD: a field of the JSON object a cairn command printed ('' when absent).
json_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], ""))' "$1" "$2"; }

cairn_bytes_read_full='' cairn_bytes_stored_full='' cairn_bytes_read_incr='' cairn_bytes_stored_incr='' cairn_bytes_written_restore='' cairn_stats=''
run_cairn() {
  local base=$work/cairn repo img rp
  img=$(fresh_image cairn)
  repo=$base/repo
  # shellcheck disable=SC2086 # CAIRN_INIT_ARGS is a list of flags
  measure cairn_init "$base" "$CAIRN" repo init "$repo" $CAIRN_INIT_ARGS
  cat "$img" >/dev/null
  measure cairn_full "$base" "$CAIRN" repo backup "$repo" --source "$img" --disk "$DISK_ID" --json
  repo_full[cairn]=$(repo_bytes "$repo")
  cairn_bytes_read_full=$(json_field "$logs/cairn_full.out" bytes_read)
  cairn_bytes_stored_full=$(json_field "$logs/cairn_full.out" bytes_stored)
  churn cairn "$img"
  measure cairn_incr "$base" "$CAIRN" repo backup "$repo" --source "$img" --disk "$DISK_ID" --json
  repo_growth[cairn]=$(($(repo_bytes "$repo") - repo_full[cairn]))
  cairn_bytes_read_incr=$(json_field "$logs/cairn_incr.out" bytes_read)
  cairn_bytes_stored_incr=$(json_field "$logs/cairn_incr.out" bytes_stored)
  rp=$(json_field "$logs/cairn_incr.out" rp)
  [[ -n $rp ]] || die "cairn: the incremental backup's --json output has no rp: $(cat "$logs/cairn_incr.out")"
  mkdir -p "$base/restore"
  measure cairn_restore "$base" "$CAIRN" repo restore "$repo" --disk "$DISK_ID" --rp "$rp" \
    --to "$base/restore/disk.raw" --format raw --json
  cairn_bytes_written_restore=$(json_field "$logs/cairn_restore.out" bytes_written)
  check_restore cairn "$base/restore/disk.raw" "$img"
  cairn_stats=$("$CAIRN" repo stats "$repo" --json 2>/dev/null || true)
  note[cairn]="\`cairn repo init${CAIRN_INIT_ARGS:+ $CAIRN_INIT_ARGS}\` (unencrypted), \`cairn repo backup --json\`, \`cairn repo restore --rp RP --format raw --json\`"
  drop_outputs cairn
}

started_at=$(date -u +'%Y-%m-%d %H:%M:%S UTC')
load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
for tool in $TOOLS; do
  "run_$tool"
done

# --- 4. report -------------------------------------------------------------------------------
churn_ranges=$(wc -l <"$churn_ref")
churn_bytes=$(awk '{s += $2} END {printf "%d", s}' "$churn_ref")

val() { local v=${1:-}; printf '%s' "${v:-n/a}"; }
# ratio A B: A/B with two decimals, or n/a.
ratio() {
  if [[ -n ${1:-} && -n ${2:-} ]] && awk -v b="$2" 'BEGIN{exit !(b > 0)}'; then
    awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'
  else
    printf 'n/a'
  fi
}
speedup() { local r; r=$(ratio "$@"); [[ $r == n/a ]] && printf 'n/a' || printf '%s×' "$r"; }
mib() { [[ -n ${1:-} ]] && awk -v b="$1" 'BEGIN{printf "%.1f MiB", b/1048576}' || printf 'n/a'; }
op_row() {
  local label=$1 op=$2 b=${secs[borg_$2]:-} r=${secs[restic_$2]:-} c=${secs[cairn_$2]:-}
  printf '| %s | %s | %s | %s | %s | %s |\n' "$label" "$(val "$b")" "$(val "$r")" "$(val "$c")" \
    "$(speedup "$b" "$c")" "$(speedup "$r" "$c")"
}
cpu_row() {
  local label=$1 op=$2 t cell
  printf '| %s |' "$label"
  for t in borg restic cairn; do
    cell=n/a
    [[ -n ${cpu[${t}_$op]:-} ]] && cell="${cpu[${t}_$op]} (load ${load[${t}_$op]})"
    printf ' %s |' "$cell"
  done
  printf '\n'
}
rss_row() {
  local label=$1 op=$2
  printf '| %s | %s | %s | %s |\n' "$label" "$(val "${rss[borg_$op]:-}")" \
    "$(val "${rss[restic_$op]:-}")" "$(val "${rss[cairn_$op]:-}")"
}
size_row() {
  local label=$1 fn=$2 t
  printf '| %s |' "$label"
  for t in borg restic cairn; do printf ' %s |' "$($fn "$t")"; done
  printf '\n'
}
full_size() { local v=${repo_full[$1]:-}; [[ -n $v ]] && printf '%s (%s)' "$v" "$(mib "$v")" || printf 'n/a'; }
growth_size() { local v=${repo_growth[$1]:-}; [[ -n $v ]] && printf '%s (%s)' "$v" "$(mib "$v")" || printf 'n/a'; }
growth_ratio() { printf '%s' "$(ratio "${repo_growth[$1]:-}" "$churn_bytes")"; }
full_vs_image() { printf '%s' "$(ratio "${repo_full[$1]:-}" "$image_alloc_bytes")"; }
peak_rss() {
  local t=$1 op m=
  for op in init full incr restore; do
    local v=${rss[${t}_$op]:-}
    [[ -n $v ]] && { [[ -z $m ]] || ((v > m)); } && m=$v
  done
  printf '%s' "$m"
}

# goal LABEL PASS_EXPR DETAIL: one PASS/FAIL/n/a line; PASS_EXPR is an awk condition.
goal() {
  local label=$1 cond=$2 detail=$3
  if [[ $cond == n/a ]]; then
    printf -- '- n/a — %s (%s)\n' "$label" "$detail"
  elif awk "BEGIN{exit !($cond)}"; then
    printf -- '- PASS — %s: %s\n' "$label" "$detail"
  else
    printf -- '- FAIL — %s: %s\n' "$label" "$detail"
  fi
}
speed_goal() {
  local label=$1 op=$2 want=$3 b=${secs[borg_$2]:-} c=${secs[cairn_$2]:-}
  if [[ -n $b && -n $c ]]; then
    goal "$label ≥ ${want}× faster than borg" "$b >= $want * $c" "borg $b s / cairn $c s = $(ratio "$b" "$c")×"
  else
    goal "$label ≥ ${want}× faster than borg" n/a "needs borg and cairn in TOOLS"
  fi
}

cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
mem_total=$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
fs_type=$(df -T "$work" | awk 'NR==2 {print $2}')

report() {
  cat <<EOF
# cairn repository benchmark

- date: $started_at (load average at start: $load_at_start)
- machine: $(nproc) CPUs ($cpu_model), $mem_total RAM, kernel $(uname -r), work dir on $fs_type
- image: ${BENCH_SIZE_MIB} MiB raw VM disk ($image_bytes bytes), $image_alloc_bytes bytes allocated ($(mib "$image_alloc_bytes")), $image_origin
- churn: \`churn-disk IMG $CHURN_PERCENT $CHURN_SEED\` wrote $churn_ranges ranges, $churn_bytes bytes ($(mib "$churn_bytes")) of fresh random data
- tools: borg $borg_version, restic $restic_version, cairn $cairn_version
- method: each tool starts from a sparse copy of the same pristine image in the page cache; every timed step ends with \`sync -f\` (SYNC_AFTER=$SYNC_AFTER); restores are checked byte-identical with \`cmp\`
EOF
  for t in borg restic cairn; do
    [[ -n ${note[$t]:-} ]] && printf -- '- %s: %s\n' "$t" "${note[$t]}"
  done
  cat <<EOF

## Time (wall seconds)

| operation | borg | restic | cairn | borg/cairn | restic/cairn |
|---|---|---|---|---|---|
$(op_row "full backup" full)
$(op_row "incremental backup" incr)
$(op_row "restore (latest, raw)" restore)

## CPU time (user+sys seconds; in brackets the 1-minute load average before the step)

| operation | borg | restic | cairn |
|---|---|---|---|
$(cpu_row "full backup" full)
$(cpu_row "incremental backup" incr)
$(cpu_row "restore (latest, raw)" restore)

## Repository size (\`du -sb\`)

| | borg | restic | cairn |
|---|---|---|---|
$(size_row "after the full backup (bytes)" full_size)
$(size_row "full size / allocated image bytes" full_vs_image)
$(size_row "growth from the incremental (bytes)" growth_size)
$(size_row "growth / churn bytes" growth_ratio)

## Peak RSS (KiB)

| step | borg | restic | cairn |
|---|---|---|---|
$(rss_row "full backup" full)
$(rss_row "incremental backup" incr)
$(rss_row "restore" restore)
EOF
  if has_tool cairn; then
    cat <<EOF

cairn's own counters: full backup read $(val "$cairn_bytes_read_full") bytes and stored $(val "$cairn_bytes_stored_full") bytes; incremental read $(val "$cairn_bytes_read_incr") bytes and stored $(val "$cairn_bytes_stored_incr") bytes; restore wrote $(val "$cairn_bytes_written_restore") bytes.
EOF
    if [[ -n $cairn_stats ]]; then
      # shellcheck disable=SC2016 # markdown backticks, not a command substitution
      printf '\n%s:\n\n```json\n%s\n```\n' '`cairn repo stats --json`' "$cairn_stats"
    fi
  fi
  printf '\n## Goals\n\n'
  speed_goal "full backup" full 4
  speed_goal "incremental backup" incr 8
  speed_goal "restore" restore 4
  local cg=${repo_growth[cairn]:-} cf=${repo_full[cairn]:-} bf=${repo_full[borg]:-} cr
  cr=$(peak_rss cairn)
  if [[ -n $cg ]]; then
    goal "cairn incremental repo growth ≤ 2× churn bytes" "$cg <= 2 * $churn_bytes" \
      "$cg bytes growth / $churn_bytes churn bytes = $(ratio "$cg" "$churn_bytes")×"
  else
    goal "cairn incremental repo growth ≤ 2× churn bytes" n/a "needs cairn in TOOLS"
  fi
  if [[ -n $cf && -n $bf ]]; then
    goal "cairn full-backup repo size ≤ 1.15 × borg's" "$cf <= 1.15 * $bf" \
      "cairn $cf bytes / borg $bf bytes = $(ratio "$cf" "$bf")"
  else
    goal "cairn full-backup repo size ≤ 1.15 × borg's" n/a "needs borg and cairn in TOOLS"
  fi
  if [[ -n $cr ]]; then
    goal "cairn peak RSS ≤ 256 MiB" "$cr <= 262144" "$cr KiB ($(awk -v k="$cr" 'BEGIN{printf "%.1f", k/1024}') MiB) at most over init, backups and restore"
  else
    goal "cairn peak RSS ≤ 256 MiB" n/a "needs cairn in TOOLS"
  fi
}

report_text=$(report)
mkdir -p "$(dirname "$OUT")"
printf '%s\n' "$report_text" >"$OUT"
printf '%s\n' "$report_text"
log "results written to $OUT"
if [[ $STRICT == 1 ]] && grep -q '^- FAIL' <<<"$report_text"; then
  exit 3
fi
