//! Retention: which recovery points of one VM to keep, as a pure planner returning one
//! [`RetentionMark`] per recovery point (after proxmox-backup's prune marks).
//!
//! A recovery point is removed once its *retention age* exceeds the group's retention range.
//! Its retention age is the time since it was taken minus the time the VM's replica spent
//! inconsistent since then: as in MABS, "any day that the replica is not consistent does not
//! count toward the retention range", and while the replica is inconsistent nothing is
//! removed at all. The newest recovery point is always kept (it is the replica the next
//! backup builds on), and so is any recovery point a running job uses.
//!
//! Must not: know about repositories or jobs; the engine turns `Remove` marks into a prune job.

use std::fmt;

const DAY_MS: u64 = 86_400_000;

/// What to do with one recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionMark {
    /// Within the retention range.
    Keep,
    /// Kept whatever its age.
    Protected(Protection),
    /// Past the retention range: prune it.
    Remove,
}

/// Why a recovery point is kept whatever its age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// The newest recovery point: the replica itself.
    Latest,
    /// The replica is inconsistent: the retention clock is paused.
    RetentionPaused,
    /// A queued or running job reads it (a restore).
    InUse,
}

impl fmt::Display for RetentionMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RetentionMark::Keep => "keep",
            RetentionMark::Remove => "remove",
            RetentionMark::Protected(Protection::Latest) => "protected (latest)",
            RetentionMark::Protected(Protection::RetentionPaused) => {
                "protected (retention paused: replica inconsistent)"
            }
            RetentionMark::Protected(Protection::InUse) => "protected (in use)",
        })
    }
}

/// One recovery point as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpAge {
    /// When it was taken (Unix ms).
    pub taken_at: u64,
    /// A job uses it.
    pub in_use: bool,
}

/// Intervals during which the replica was inconsistent: closed ones, and whether one is open
/// now (since when).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paused<'a> {
    pub closed: &'a [(u64, u64)],
    pub open_since: Option<u64>,
}

/// The retention age of a recovery point taken at `taken_at`.
pub fn retention_age(taken_at: u64, paused: &Paused<'_>, now: u64) -> u64 {
    let overlap = |(from, to): (u64, u64)| to.min(now).saturating_sub(from.max(taken_at));
    let paused_ms: u64 = paused.closed.iter().map(|i| overlap(*i)).sum::<u64>()
        + paused.open_since.map_or(0, |since| overlap((since, now)));
    now.saturating_sub(taken_at).saturating_sub(paused_ms)
}

/// Marks for `rps` (oldest first, as the catalog keeps them).
pub fn plan(
    rps: &[RpAge],
    retention_days: u16,
    paused: &Paused<'_>,
    now: u64,
) -> Vec<RetentionMark> {
    let range = u64::from(retention_days) * DAY_MS;
    let newest = rps.iter().map(|r| r.taken_at).max();
    rps.iter()
        .map(|rp| {
            if Some(rp.taken_at) == newest {
                RetentionMark::Protected(Protection::Latest)
            } else if rp.in_use {
                RetentionMark::Protected(Protection::InUse)
            } else if paused.open_since.is_some() {
                RetentionMark::Protected(Protection::RetentionPaused)
            } else if retention_age(rp.taken_at, paused, now) > range {
                RetentionMark::Remove
            } else {
                RetentionMark::Keep
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;
    const NOW: u64 = 100 * DAY_MS;

    fn rp(days_ago: f64) -> RpAge {
        RpAge {
            taken_at: NOW - (days_ago * DAY_MS as f64) as u64,
            in_use: false,
        }
    }

    use RetentionMark::{Keep, Protected, Remove};

    #[test]
    fn table_of_retention() {
        let no_pause = Paused::default();
        let closed = [(NOW - 3 * DAY_MS, NOW - DAY_MS)];
        let paused_two_days = Paused {
            closed: &closed,
            open_since: None,
        };
        let paused_now = Paused {
            closed: &[],
            open_since: Some(NOW - 2 * H),
        };
        let in_use = RpAge {
            in_use: true,
            ..rp(9.0)
        };
        // (name, rps, retention days, paused, now, marks)
        type Case<'a> = (
            &'a str,
            Vec<RpAge>,
            u16,
            &'a Paused<'a>,
            u64,
            Vec<RetentionMark>,
        );
        let cases: Vec<Case> = vec![
            ("nothing to do", vec![], 5, &no_pause, NOW, vec![]),
            (
                "older than the range go, the newest always stays",
                vec![rp(7.0), rp(5.5), rp(4.9), rp(0.1)],
                5,
                &no_pause,
                NOW,
                vec![Remove, Remove, Keep, Protected(Protection::Latest)],
            ),
            (
                "exactly at the range is kept",
                vec![rp(5.0), rp(1.0)],
                5,
                &no_pause,
                NOW,
                vec![Keep, Protected(Protection::Latest)],
            ),
            (
                "a lone old recovery point is the replica: kept",
                vec![rp(30.0)],
                5,
                &no_pause,
                NOW,
                vec![Protected(Protection::Latest)],
            ),
            (
                "two inconsistent days do not count",
                vec![rp(6.5), rp(7.5), rp(0.5)],
                5,
                &paused_two_days,
                NOW,
                vec![Keep, Remove, Protected(Protection::Latest)],
            ),
            (
                "inconsistent now: nothing is removed",
                vec![rp(50.0), rp(10.0), rp(0.5)],
                5,
                &paused_now,
                NOW,
                vec![
                    Protected(Protection::RetentionPaused),
                    Protected(Protection::RetentionPaused),
                    Protected(Protection::Latest),
                ],
            ),
            (
                "a recovery point being restored stays",
                vec![in_use, rp(8.0), rp(0.2)],
                5,
                &no_pause,
                NOW,
                vec![
                    Protected(Protection::InUse),
                    Remove,
                    Protected(Protection::Latest),
                ],
            ),
            (
                "clock jumped back before the recovery points: ages are zero, all kept",
                vec![rp(3.0), rp(1.0)],
                1,
                &no_pause,
                NOW - 10 * DAY_MS,
                vec![Keep, Protected(Protection::Latest)],
            ),
            (
                "clock jumped forward a year: all but the newest go",
                vec![rp(3.0), rp(1.0), rp(0.5)],
                5,
                &no_pause,
                NOW + 365 * DAY_MS,
                vec![Remove, Remove, Protected(Protection::Latest)],
            ),
        ];
        for (name, rps, days, paused, now, expected) in cases {
            assert_eq!(plan(&rps, days, paused, now), expected, "{name}");
        }
    }

    #[test]
    fn retention_age_subtracts_only_the_overlap() {
        let closed = [(10 * H, 20 * H), (30 * H, 31 * H)];
        let paused = Paused {
            closed: &closed,
            open_since: Some(40 * H),
        };
        assert_eq!(
            retention_age(0, &paused, 50 * H),
            50 * H - 10 * H - H - 10 * H
        );
        assert_eq!(
            retention_age(15 * H, &paused, 50 * H),
            35 * H - 5 * H - H - 10 * H
        );
        assert_eq!(retention_age(45 * H, &paused, 50 * H), 0);
    }
}
