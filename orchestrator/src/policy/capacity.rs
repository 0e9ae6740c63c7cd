//! Disk allocation review: how much repository space a protection group needs, from the data
//! it protects, the churn its recovery points measured and its retention range (MABS's
//! "Review Disk Allocation": total data size, space to provision, under-provisioned space),
//! and the estimate a job's start is checked against so that it fails early and clearly
//! instead of filling the repository.
//!
//! Model: the replica (one full copy, as stored) plus one day of churn for every day of
//! retention and one more for the backup in progress, plus 10% headroom. Churn is measured
//! from the bytes the last 7 days of incremental recovery points stored; with no measurement
//! yet it is estimated as 10% of the replica per day (MABS's planning assumption).
//!
//! The review also gives the space a running VM's backup needs beside its disks for the
//! fleecing overlay (MABS's shadow-copy formula: disk size × churn × backup window): the
//! guest's writes during the backup window copy the old blocks there. With each member's
//! churn rate (its daily churn over its replica), the largest member's overlay is
//! `disk size × churn rate × BACKUP_WINDOW_MS / day`.
//!
//! Must not: read the filesystem. Free space comes from workers' reports (events).

const DAY_MS: u64 = 86_400_000;
const CHURN_WINDOW_MS: u64 = 7 * DAY_MS;
/// The backup window the fleecing overlay estimate assumes: one hour.
pub const BACKUP_WINDOW_MS: u64 = 3_600_000;

/// One recovery point as capacity planning sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpUsage {
    pub taken_at: u64,
    /// Bytes it added to the repository.
    pub bytes_stored: u64,
    /// A full copy (no parent).
    pub full: bool,
}

/// One VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmUsage {
    /// Sum of its disks' virtual sizes.
    pub disk_bytes: u64,
    /// Its recovery points, oldest first.
    pub rps: Vec<RpUsage>,
}

/// The review.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityPlan {
    /// Virtual size of all protected disks.
    pub data_bytes: u64,
    /// Size of the replicas as stored (or the virtual size where nothing is stored yet).
    pub replica_bytes: u64,
    /// What the group's recovery points hold in the repository now.
    pub stored_bytes: u64,
    /// Bytes a day of changes costs.
    pub churn_bytes_per_day: u64,
    /// Whether the churn was measured (else estimated).
    pub churn_measured: bool,
    /// Space the group should have in the repository.
    pub recommended_bytes: u64,
    /// Free space of the repository, if a worker reported it.
    pub free_bytes: Option<u64>,
    /// Space that has to be added for the recommendation to fit, if free space is known.
    pub under_provisioned_bytes: Option<u64>,
    /// Space the fleecing overlay of the largest member's backup needs on its node (disk size
    /// × churn rate × [`BACKUP_WINDOW_MS`]).
    pub overlay_bytes: u64,
}

/// Bytes a day of changes costs, over the incremental recovery points of the last 7 days (at
/// least an hour, so one early backup does not extrapolate wildly); `None` without any.
fn measured_churn<'a>(rps: impl Iterator<Item = &'a RpUsage>, now: u64) -> Option<u64> {
    let window_start = now.saturating_sub(CHURN_WINDOW_MS);
    let (mut oldest, mut bytes, mut any) = (u64::MAX, 0u64, false);
    for r in rps.filter(|r| !r.full && r.taken_at >= window_start && r.taken_at <= now) {
        oldest = oldest.min(r.taken_at);
        bytes = bytes.saturating_add(r.bytes_stored);
        any = true;
    }
    any.then(|| {
        let span = now.saturating_sub(oldest).max(3_600_000);
        (bytes as u128 * DAY_MS as u128 / span as u128) as u64
    })
}

/// The fleecing overlay one VM's backup needs: its disk size × its churn rate (daily churn
/// over its replica, 10% when not measured yet) × the backup window.
pub fn overlay_estimate(vm: &VmUsage, now: u64) -> u64 {
    let replica = vm
        .rps
        .iter()
        .find(|r| r.full)
        .map_or(vm.disk_bytes, |r| r.bytes_stored)
        .max(1);
    let per_day = measured_churn(vm.rps.iter(), now).unwrap_or(replica / 10);
    let rate_per_day = (per_day as f64 / replica as f64).min(1.0);
    (vm.disk_bytes as f64 * rate_per_day * BACKUP_WINDOW_MS as f64 / DAY_MS as f64) as u64
}

/// Reviews a group of `vms` kept `retention_days` in a repository with `free_bytes` free.
pub fn plan(
    vms: &[VmUsage],
    retention_days: u16,
    free_bytes: Option<u64>,
    now: u64,
) -> CapacityPlan {
    let data_bytes: u64 = vms.iter().map(|v| v.disk_bytes).sum();
    let replica_bytes: u64 = vms
        .iter()
        .map(|v| {
            v.rps
                .iter()
                .find(|r| r.full)
                .map_or(v.disk_bytes, |r| r.bytes_stored)
        })
        .sum();
    let stored_bytes: u64 = vms
        .iter()
        .flat_map(|v| v.rps.iter())
        .map(|r| r.bytes_stored)
        .sum();
    let (churn_bytes_per_day, churn_measured) =
        match measured_churn(vms.iter().flat_map(|v| v.rps.iter()), now) {
            Some(per_day) => (per_day, true),
            None => (replica_bytes / 10, false),
        };
    let needed = replica_bytes
        .saturating_add(churn_bytes_per_day.saturating_mul(u64::from(retention_days) + 1));
    let recommended_bytes = needed.saturating_add(needed / 10);
    let under_provisioned_bytes = free_bytes.map(|free| {
        recommended_bytes
            .saturating_sub(stored_bytes)
            .saturating_sub(free)
    });
    CapacityPlan {
        data_bytes,
        replica_bytes,
        stored_bytes,
        churn_bytes_per_day,
        churn_measured,
        recommended_bytes,
        free_bytes,
        under_provisioned_bytes,
        overlay_bytes: vms
            .iter()
            .map(|v| overlay_estimate(v, now))
            .max()
            .unwrap_or(0),
    }
}

/// Bytes the next backup or consistency check of a VM may add: its whole size when it has no
/// replica yet, else twice the largest of its last three incremental recovery points (at least
/// one chunk's worth), so a job that cannot fit fails before it starts.
pub fn job_estimate(vm: &VmUsage) -> u64 {
    if vm.rps.is_empty() {
        return vm.disk_bytes;
    }
    let recent = vm
        .rps
        .iter()
        .rev()
        .filter(|r| !r.full)
        .take(3)
        .map(|r| r.bytes_stored)
        .max()
        .unwrap_or(0);
    recent.saturating_mul(2).max(64 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const NOW: u64 = 30 * DAY_MS;

    fn vm(disk: u64, rps: &[(u64, u64, bool)]) -> VmUsage {
        VmUsage {
            disk_bytes: disk,
            rps: rps
                .iter()
                .map(|(days_ago, bytes, full)| RpUsage {
                    taken_at: NOW - days_ago * DAY_MS,
                    bytes_stored: *bytes,
                    full: *full,
                })
                .collect(),
        }
    }

    #[test]
    fn measured_churn_and_retention_make_the_recommendation() {
        // A 100 GiB VM stored as 40 GiB, then 1 GiB a day for the last 4 days.
        let vms = [vm(
            100 * GIB,
            &[
                (10, 40 * GIB, true),
                (4, GIB, false),
                (3, GIB, false),
                (2, GIB, false),
                (1, GIB, false),
            ],
        )];
        let plan = plan(&vms, 5, Some(10 * GIB), NOW);
        assert_eq!(plan.data_bytes, 100 * GIB);
        assert_eq!(plan.replica_bytes, 40 * GIB);
        assert_eq!(plan.stored_bytes, 44 * GIB);
        assert!(plan.churn_measured);
        assert_eq!(plan.churn_bytes_per_day, GIB);
        // (40 + 6 × 1) × 1.1 = 50.6 GiB; 44 stored, so 6.6 more, 10 free: nothing missing.
        assert_eq!(plan.recommended_bytes, 46 * GIB + 46 * GIB / 10);
        assert_eq!(plan.under_provisioned_bytes, Some(0));
        // 1 GiB a day over a 40 GiB replica is 2.5% a day; an hour of it on a 100 GiB disk.
        let overlay = plan.overlay_bytes as f64;
        let expected = 100.0 * GIB as f64 * 0.025 / 24.0;
        assert!(
            (overlay - expected).abs() < 1024.0,
            "{overlay} vs {expected}"
        );
        let tight = super::plan(&vms, 30, Some(GIB), NOW);
        // (40 + 31) × 1.1 = 78.1 GiB; 44 stored + 1 free → 33.1 GiB missing.
        assert_eq!(
            tight.under_provisioned_bytes,
            Some(71 * GIB + 71 * GIB / 10 - 45 * GIB)
        );
    }

    #[test]
    fn without_measurements_the_estimate_is_used() {
        let vms = [vm(100 * GIB, &[]), vm(50 * GIB, &[(0, 20 * GIB, true)])];
        let plan = plan(&vms, 5, None, NOW);
        assert_eq!(plan.replica_bytes, 120 * GIB);
        assert!(!plan.churn_measured);
        assert_eq!(plan.churn_bytes_per_day, 12 * GIB);
        assert_eq!(plan.under_provisioned_bytes, None);
    }

    #[test]
    fn job_estimates() {
        assert_eq!(job_estimate(&vm(8 * GIB, &[])), 8 * GIB);
        let busy = vm(
            8 * GIB,
            &[(3, GIB, true), (2, 100, false), (1, 5_000_000, false)],
        );
        assert_eq!(job_estimate(&busy), 10_000_000);
        assert_eq!(job_estimate(&vm(8 * GIB, &[(1, GIB, true)])), 64 * 1024);
    }
}
