#!/usr/bin/env bash
# full-backup-ab.sh — full backups of one raw image by borg and by several cairn binaries,
# interleaved round by round, to compare cairn builds against each other and against borg in
# the same run (the machine's speed drifts between runs; interleaving cancels most of it).
#
# Usage: ops/bench/full-backup-ab.sh IMAGE ROUNDS CAIRN_BINARY...
#   IMAGE   a raw disk image (e.g. built by make-vm-disk); it is read from the page cache
#   ROUNDS  how many rounds; each round runs borg once, then every cairn binary once
# Environment: WORK (work dir, default a new mktemp dir under /var/tmp, removed at the end).
# Prints, per tool, the wall seconds of every round, the median CPU seconds (user+sys), and the
# ratio borg / tool of every round. Every timed backup ends with `sync -f`.
set -euo pipefail
(($# >= 3)) || { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
image=$(realpath "$1") rounds=$2
shift 2
for b in "$@"; do [[ -x $b ]] || { echo "full-backup-ab: $b is not executable" >&2; exit 2; }; done
command -v borg >/dev/null || { echo "full-backup-ab: borg is not installed" >&2; exit 2; }
work=${WORK:-$(mktemp -d /var/tmp/full-ab.XXXXXX)}
trap '[[ -z ${WORK:-} ]] && rm -rf "$work"' EXIT
export BORG_BASE_DIR=$work/borg-home BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
times=$work/times
: >"$times"
cat "$image" >/dev/null
for round in $(seq "$rounds"); do
  rm -rf "$work/borg"
  borg init -e none "$work/borg" >/dev/null 2>&1
  (cd "$(dirname "$image")" && /usr/bin/time -a -o "$times" -f "borg %e %U %S" \
    sh -c "borg create --compression zstd,3 '$work/borg::full' '$(basename "$image")' && sync -f '$work'")
  i=0
  for b in "$@"; do
    i=$((i + 1))
    rm -rf "$work/cairn"
    "$b" repo init "$work/cairn" >/dev/null
    /usr/bin/time -a -o "$times" -f "cairn$i:$(basename "$b") %e %U %S" \
      sh -c "'$b' repo backup '$work/cairn' --source '$image' --disk d >/dev/null && sync -f '$work'"
  done
  echo "round $round of $rounds done" >&2
done
python3 - "$times" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, wall, user, sys_ = line.split()
    runs[name].append((float(wall), float(user) + float(sys_)))
borg = [w for w, _ in runs["borg"]]
for name, rows in runs.items():
    walls = [w for w, _ in rows]
    ratios = [b / w for b, w in zip(borg, walls)]
    print(f"{name:28} wall {' '.join(f'{w:.2f}' for w in walls)} | "
          f"cpu median {statistics.median(c for _, c in rows):.2f} | "
          f"borg/this {' '.join(f'{r:.2f}' for r in ratios)} median {statistics.median(ratios):.2f}")
PY
