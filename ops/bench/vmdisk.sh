# Sourced by the benchmarks: the repository's own disk builder and churn tool (ops/vmdisk),
# built in release mode unless MAKE_VM_DISK / CHURN_DISK name other ones.
#   vmdisk_tools REPO_ROOT  sets MAKE_VM_DISK and CHURN_DISK, building them when needed.
vmdisk_tools() {
  local root=$1 target
  target=${CARGO_TARGET_DIR:-$root/target}/release
  if [[ -z ${MAKE_VM_DISK:-} || -z ${CHURN_DISK:-} ]]; then
    (cd "$root" && cargo build --quiet --release --locked -p cairn-vmdisk --bins >&2)
  fi
  MAKE_VM_DISK=${MAKE_VM_DISK:-$target/make-vm-disk}
  CHURN_DISK=${CHURN_DISK:-$target/churn-disk}
  [[ -x $MAKE_VM_DISK ]] || { echo "make-vm-disk is not executable: $MAKE_VM_DISK" >&2; return 2; }
  [[ -x $CHURN_DISK ]] || { echo "churn-disk is not executable: $CHURN_DISK" >&2; return 2; }
}
