//! The scheduler: which run a protection group's policy makes due for one VM, as a pure
//! function of (policy, the VM's history, now). The engine calls it on every tick with its
//! injected clock and requests what it returns.
//!
//! Semantics (MABS's, adapted to block-level VM backups where every synchronization makes a
//! recovery point):
//! - **Synchronization every N minutes** runs on a fixed grid of elapsed time anchored at
//!   local midnight of *standard* time (intervals are durations, so a DST change neither
//!   skips nor doubles a synchronization); the recovery point times of the schedule are extra
//!   slots on the wall clock of the group's time zone.
//! - **Just before a recovery point**: only the recovery point times, on their days.
//! - **Express full** times (wall clock) make that slot an express full backup.
//! - A slot is *served* once any run that makes a recovery point was requested at or after it.
//!   Only the latest slot that is not later than `now` counts, so after downtime (or a clock
//!   jump forward) the VM gets one catch-up run, not a burst; after a clock jump backward the
//!   slots up to the last request count as served, so nothing runs twice.
//! - **Replica creation**: `Now` runs the initial replication at once, `At` from that time,
//!   `ManualSeed` never (an administrator imports a seed).
//! - **Replica inconsistent**: no backups (they would fail, as in MABS); a consistency check
//!   is due at once when the policy repairs automatically (then again at most daily while it
//!   keeps failing), or once per opening of the scheduled window; otherwise only by hand.
//!
//! Must not: read a clock, look at other VMs, or decide anything the reconciler decides
//! (limits, nodes): it only says what is due.

use cairn_schemas::{
    ConsistencyCheckWindow, GroupPolicy, ReplicaCreation, Schedule, SyncFrequency,
};

use super::tz::{TimeZone, add_days, weekday};

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;

/// What kind of run is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// The first full copy.
    InitialReplication,
    /// An incremental backup (a synchronization that makes a recovery point).
    Sync,
    /// A backup that reads every block.
    ExpressFull,
    /// A consistency check of an inconsistent replica.
    ConsistencyCheck,
}

/// A run the scheduler wants, and the slot it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub kind: RunKind,
    /// The scheduled instant it serves (Unix ms); `now` for runs due at once.
    pub slot: u64,
}

/// Where a VM's replica stands, as far as scheduling goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaStatus {
    /// No replica yet.
    None,
    /// A consistent replica.
    Consistent,
    /// Inconsistent since this instant (Unix ms).
    InconsistentSince(u64),
}

/// What the scheduler needs to know about one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmHistory {
    pub replica: ReplicaStatus,
    /// When the latest run that makes a recovery point (backup, initial replication,
    /// consistency check, seed import) was requested.
    pub last_rp_request: Option<u64>,
    /// When the latest consistency check was requested.
    pub last_check_request: Option<u64>,
    /// A run that makes a recovery point is queued or running.
    pub active: bool,
}

/// The group-wide part of the answer, computed once per group and tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupSlots {
    /// Latest synchronization slot ≤ now.
    pub sync: Option<u64>,
    /// Latest express full slot ≤ now.
    pub express_full: Option<u64>,
    /// Start of the consistency check window open at `now`, if one is.
    pub check_window: Option<u64>,
}

/// The slots of `policy` at `now` in zone `tz`.
pub fn group_slots(policy: &GroupPolicy, tz: &TimeZone, now: u64) -> GroupSlots {
    let rp_slot = latest_wall_slot(&policy.recovery_points, tz, now);
    let sync = match policy.sync {
        SyncFrequency::EveryMinutes(minutes) => {
            let every = u64::from(minutes.max(1)) * MINUTE_MS;
            let std = i64::from(tz.standard_offset_minutes(now as i64)) * MINUTE_MS as i64;
            let shifted = now as i64 + std;
            let grid = shifted - shifted.rem_euclid(every as i64) - std;
            let grid = u64::try_from(grid).ok();
            grid.max(rp_slot)
        }
        SyncFrequency::JustBeforeRecoveryPoint => rp_slot,
    };
    GroupSlots {
        sync,
        express_full: latest_wall_slot(&policy.express_full, tz, now),
        check_window: policy
            .consistency_check
            .window
            .as_ref()
            .and_then(|w| open_window(w, tz, now)),
    }
}

/// The run due for one VM, if any.
pub fn due_for_vm(
    policy: &GroupPolicy,
    slots: &GroupSlots,
    vm: &VmHistory,
    now: u64,
) -> Option<Due> {
    if vm.active {
        return None;
    }
    let served = |slot: u64| vm.last_rp_request.is_some_and(|t| t >= slot);
    match vm.replica {
        ReplicaStatus::InconsistentSince(since) => {
            let checked_since = vm.last_check_request.filter(|t| *t >= since);
            if policy.consistency_check.when_inconsistent
                && checked_since.is_none_or(|t| now.saturating_sub(t) >= DAY_MS)
            {
                return Some(Due {
                    kind: RunKind::ConsistencyCheck,
                    slot: now,
                });
            }
            let window = slots.check_window?;
            if vm.last_check_request.is_none_or(|t| t < window.max(since)) {
                return Some(Due {
                    kind: RunKind::ConsistencyCheck,
                    slot: window,
                });
            }
            None
        }
        ReplicaStatus::None => {
            let start = match policy.replica_creation {
                ReplicaCreation::ManualSeed => return None,
                ReplicaCreation::Now => 0,
                ReplicaCreation::At { unix_millis } => unix_millis,
            };
            if now < start {
                return None;
            }
            // The first attempt at once; a failed one again at the next synchronization slot.
            let retry_slot = slots.sync.unwrap_or(0).max(start);
            if vm.last_rp_request.is_none() || !served(retry_slot) {
                return Some(Due {
                    kind: RunKind::InitialReplication,
                    slot: retry_slot.max(start),
                });
            }
            None
        }
        ReplicaStatus::Consistent => {
            if let Some(slot) = slots.express_full.filter(|s| !served(*s)) {
                return Some(Due {
                    kind: RunKind::ExpressFull,
                    slot,
                });
            }
            slots.sync.filter(|s| !served(*s)).map(|slot| Due {
                kind: RunKind::Sync,
                slot,
            })
        }
    }
}

/// [`group_slots`] and [`due_for_vm`] in one call.
pub fn due(policy: &GroupPolicy, tz: &TimeZone, vm: &VmHistory, now: u64) -> Option<Due> {
    due_for_vm(policy, &group_slots(policy, tz, now), vm, now)
}

/// The latest instant ≤ `now` at which `schedule` fires.
pub fn latest_wall_slot(schedule: &Schedule, tz: &TimeZone, now: u64) -> Option<u64> {
    if schedule.times.is_empty() {
        return None;
    }
    let (today, _) = tz.local(now as i64);
    // Two extra days cover offsets and DST: a slot of "yesterday" may be later in UTC than
    // one of "today" only across a change, never by more than a day.
    (-8..=1)
        .rev()
        .filter_map(|n| add_days(today, n))
        .filter(|day| schedule.days.contains(weekday(*day)))
        .flat_map(|day| schedule.times.iter().map(move |t| (day, t.minute_of_day)))
        .filter_map(|(day, minute)| tz.to_utc(day, minute))
        .filter(|utc| *utc >= 0 && *utc as u64 <= now)
        .max()
        .map(|utc| utc as u64)
}

/// The earliest instant > `now` at which `schedule` fires (for views).
pub fn next_wall_slot(schedule: &Schedule, tz: &TimeZone, now: u64) -> Option<u64> {
    if schedule.times.is_empty() {
        return None;
    }
    let (today, _) = tz.local(now as i64);
    (-1..=8)
        .filter_map(|n| add_days(today, n))
        .filter(|day| schedule.days.contains(weekday(*day)))
        .flat_map(|day| schedule.times.iter().map(move |t| (day, t.minute_of_day)))
        .filter_map(|(day, minute)| tz.to_utc(day, minute))
        .filter(|utc| *utc > now as i64)
        .min()
        .map(|utc| utc as u64)
}

/// The next synchronization slot after `now` (for views).
pub fn next_sync(policy: &GroupPolicy, tz: &TimeZone, now: u64) -> Option<u64> {
    let rp = next_wall_slot(&policy.recovery_points, tz, now);
    match policy.sync {
        SyncFrequency::EveryMinutes(minutes) => {
            let every = u64::from(minutes.max(1)) * MINUTE_MS;
            let std = i64::from(tz.standard_offset_minutes(now as i64)) * MINUTE_MS as i64;
            let shifted = now as i64 + std;
            let grid = (shifted - shifted.rem_euclid(every as i64) - std) as u64 + every;
            Some(rp.map_or(grid, |rp| rp.min(grid)))
        }
        SyncFrequency::JustBeforeRecoveryPoint => rp,
    }
}

/// The start of the window open at `now`, if any.
fn open_window(window: &ConsistencyCheckWindow, tz: &TimeZone, now: u64) -> Option<u64> {
    let schedule = Schedule {
        times: vec![window.start],
        days: window.days,
    };
    let start = latest_wall_slot(&schedule, tz, now)?;
    (now < start + u64::from(window.max_duration_minutes) * MINUTE_MS).then_some(start)
}

#[cfg(test)]
mod tests {
    use cairn_schemas::{ConsistencyCheckPolicy, TimeOfDay, Weekdays};

    use jiff::civil::date;

    use super::super::tz::utc_midnight_ms;
    use super::*;

    fn at(y: i16, mo: i8, d: i8, h: u64, mi: u64) -> u64 {
        utc_midnight_ms(date(y, mo, d)) as u64 + h * 3_600_000 + mi * MINUTE_MS
    }

    fn policy(sync: SyncFrequency, rp_times: &[(u16, u16)]) -> GroupPolicy {
        let mut p = GroupPolicy::with_defaults("/repo");
        p.sync = sync;
        p.recovery_points = Schedule {
            times: rp_times
                .iter()
                .map(|(h, m)| TimeOfDay::hm(*h, *m))
                .collect(),
            days: Weekdays::ALL,
        };
        p.express_full = Schedule {
            times: vec![],
            days: Weekdays { bits: 0 },
        };
        p
    }

    fn protected(last: Option<u64>) -> VmHistory {
        VmHistory {
            replica: ReplicaStatus::Consistent,
            last_rp_request: last,
            last_check_request: None,
            active: false,
        }
    }

    fn sync(slot: u64) -> Option<Due> {
        Some(Due {
            kind: RunKind::Sync,
            slot,
        })
    }

    #[test]
    fn table_of_schedules() {
        let utc = TimeZone::UTC;
        let berlin = TimeZone::parse("Europe/Berlin").unwrap();
        let every15 = policy(SyncFrequency::EveryMinutes(15), &[(20, 0)]);
        let before_rp = policy(SyncFrequency::JustBeforeRecoveryPoint, &[(8, 0), (20, 0)]);
        let hourly_rp_half = policy(SyncFrequency::EveryMinutes(60), &[(20, 30)]);
        let daily = policy(SyncFrequency::EveryMinutes(1440), &[(20, 0)]);
        let at_0230 = policy(SyncFrequency::JustBeforeRecoveryPoint, &[(2, 30)]);
        let day = |h, m| at(2026, 6, 10, h, m);
        // (name, policy, zone, history, now, expected)
        type Case<'a> = (
            &'a str,
            &'a GroupPolicy,
            &'a TimeZone,
            VmHistory,
            u64,
            Option<Due>,
        );
        let cases: Vec<Case> = vec![
            (
                "first sync on the grid",
                &every15,
                &utc,
                protected(None),
                day(10, 7),
                sync(day(10, 0)),
            ),
            (
                "slot already served",
                &every15,
                &utc,
                protected(Some(day(10, 1))),
                day(10, 14),
                None,
            ),
            (
                "next slot",
                &every15,
                &utc,
                protected(Some(day(10, 1))),
                day(10, 15),
                sync(day(10, 15)),
            ),
            (
                "downtime of 5 hours: one catch-up for the latest slot",
                &every15,
                &utc,
                protected(Some(day(5, 0))),
                day(10, 7),
                sync(day(10, 0)),
            ),
            (
                "clock jumped back an hour: slots up to the last request count as served",
                &every15,
                &utc,
                protected(Some(day(11, 2))),
                day(10, 20),
                None,
            ),
            (
                "clock jumped forward a day: one catch-up",
                &every15,
                &utc,
                protected(Some(day(10, 0))),
                at(2026, 6, 11, 10, 3),
                sync(at(2026, 6, 11, 10, 0)),
            ),
            (
                "a running backup blocks",
                &every15,
                &utc,
                VmHistory {
                    active: true,
                    ..protected(None)
                },
                day(10, 7),
                None,
            ),
            (
                "before RP: waits for 08:00",
                &before_rp,
                &utc,
                protected(Some(at(2026, 6, 9, 20, 0))),
                day(7, 59),
                None,
            ),
            (
                "before RP: 08:00",
                &before_rp,
                &utc,
                protected(Some(at(2026, 6, 9, 20, 0))),
                day(8, 0),
                sync(day(8, 0)),
            ),
            (
                "before RP: missed 08:00 and 20:00, one run",
                &before_rp,
                &utc,
                protected(Some(at(2026, 6, 9, 20, 0))),
                day(21, 0),
                sync(day(20, 0)),
            ),
            (
                "hourly grid plus a 20:30 RP",
                &hourly_rp_half,
                &utc,
                protected(Some(day(20, 0))),
                day(20, 31),
                sync(day(20, 30)),
            ),
            (
                "daily sync on the standard-time grid",
                &daily,
                &utc,
                protected(Some(day(0, 0))),
                day(23, 0),
                sync(day(20, 0)),
            ),
            (
                "Berlin summer: 20:00 wall is 18:00 UTC",
                &before_rp,
                &berlin,
                protected(Some(day(6, 0))),
                day(18, 1),
                sync(day(18, 0)),
            ),
            (
                "Berlin winter: 20:00 wall is 19:00 UTC",
                &before_rp,
                &berlin,
                protected(Some(at(2026, 12, 10, 7, 0))),
                at(2026, 12, 10, 18, 30),
                None,
            ),
            (
                "DST spring: 02:30 does not exist, runs at 03:30 CEST",
                &at_0230,
                &berlin,
                protected(Some(at(2026, 3, 28, 1, 30))),
                at(2026, 3, 29, 1, 30),
                sync(at(2026, 3, 29, 1, 30)),
            ),
            (
                "DST autumn: 02:30 happens twice, runs once (first)",
                &at_0230,
                &berlin,
                protected(Some(at(2026, 10, 25, 0, 30))),
                at(2026, 10, 25, 1, 30),
                None,
            ),
            (
                "DST autumn: 15-minute grid keeps running through the repeated hour",
                &every15,
                &berlin,
                protected(Some(at(2026, 10, 25, 0, 45))),
                at(2026, 10, 25, 1, 2),
                sync(at(2026, 10, 25, 1, 0)),
            ),
        ];
        for (name, policy, tz, history, now, expected) in cases {
            assert_eq!(due(policy, tz, &history, now), expected, "{name}");
        }
    }

    /// The next two offset changes after 1 January 2026, from jiff's copy of the IANA
    /// database: (instant, new offset in minutes).
    fn changes_in_2026(zone: &TimeZone) -> Vec<(String, i32)> {
        let start = jiff::Timestamp::from_millisecond(at(2026, 1, 1, 0, 0) as i64).unwrap();
        zone.jiff()
            .following(start)
            .take(2)
            .map(|t| (t.timestamp().to_string(), t.offset().seconds() / 60))
            .collect()
    }

    #[test]
    fn southern_hemisphere_schedules_across_their_dst_changes() {
        let sydney = TimeZone::parse("Australia/Sydney").unwrap();
        let santiago = TimeZone::parse("America/Santiago").unwrap();
        // Sydney: back on the first Sunday of April (03:00 AEDT -> 02:00 AEST on 5 April),
        // forward on the first Sunday of October (02:00 AEST -> 03:00 AEDT on 4 October).
        assert_eq!(
            changes_in_2026(&sydney),
            [
                ("2026-04-04T16:00:00Z".to_owned(), 600),
                ("2026-10-03T16:00:00Z".to_owned(), 660)
            ]
        );
        // Santiago: back at 00:00 on Sunday 5 April (to 23:00 on Saturday 4 April), forward
        // at 00:00 on Sunday 6 September (to 01:00): the first Sundays on or after the 2nd.
        assert_eq!(
            changes_in_2026(&santiago),
            [
                ("2026-04-05T03:00:00Z".to_owned(), -240),
                ("2026-09-06T04:00:00Z".to_owned(), -180)
            ]
        );
        let at_0230 = policy(SyncFrequency::JustBeforeRecoveryPoint, &[(2, 30)]);
        let at_2000 = policy(SyncFrequency::JustBeforeRecoveryPoint, &[(20, 0)]);
        let at_2330 = policy(SyncFrequency::JustBeforeRecoveryPoint, &[(23, 30)]);
        let at_0030 = policy(SyncFrequency::JustBeforeRecoveryPoint, &[(0, 30)]);
        let every15 = policy(SyncFrequency::EveryMinutes(15), &[(20, 0)]);
        // (name, policy, zone, last request, now, expected)
        type Case<'a> = (
            &'a str,
            &'a GroupPolicy,
            &'a TimeZone,
            u64,
            u64,
            Option<Due>,
        );
        let cases: Vec<Case> = vec![
            (
                "Sydney summer: 20:00 AEDT is 09:00 UTC",
                &at_2000,
                &sydney,
                at(2026, 1, 9, 9, 0),
                at(2026, 1, 10, 9, 0),
                sync(at(2026, 1, 10, 9, 0)),
            ),
            (
                "Sydney winter: 20:00 AEST is 10:00 UTC",
                &at_2000,
                &sydney,
                at(2026, 7, 9, 10, 0),
                at(2026, 7, 10, 9, 59),
                None,
            ),
            (
                "Sydney April: 02:30 happens twice, the first (AEDT) runs",
                &at_0230,
                &sydney,
                at(2026, 4, 3, 15, 30),
                at(2026, 4, 4, 15, 30),
                sync(at(2026, 4, 4, 15, 30)),
            ),
            (
                "Sydney April: the second 02:30 (AEST) does not run again",
                &at_0230,
                &sydney,
                at(2026, 4, 4, 15, 30),
                at(2026, 4, 4, 16, 30),
                None,
            ),
            (
                "Sydney October: 02:30 does not exist, nothing at 02:00 AEST + 30 min",
                &at_0230,
                &sydney,
                at(2026, 10, 2, 16, 30),
                at(2026, 10, 3, 16, 29),
                None,
            ),
            (
                "Sydney October: 02:30 does not exist, runs at 03:30 AEDT",
                &at_0230,
                &sydney,
                at(2026, 10, 2, 16, 30),
                at(2026, 10, 3, 16, 30),
                sync(at(2026, 10, 3, 16, 30)),
            ),
            (
                "Sydney April: a 15-minute grid runs through the repeated hour",
                &every15,
                &sydney,
                at(2026, 4, 4, 15, 45),
                at(2026, 4, 4, 16, 2),
                sync(at(2026, 4, 4, 16, 0)),
            ),
            (
                "Santiago April: 23:30 on Saturday happens twice, the first (-03) runs",
                &at_2330,
                &santiago,
                at(2026, 4, 4, 2, 30),
                at(2026, 4, 5, 2, 30),
                sync(at(2026, 4, 5, 2, 30)),
            ),
            (
                "Santiago April: the second 23:30 (-04) does not run again",
                &at_2330,
                &santiago,
                at(2026, 4, 5, 2, 30),
                at(2026, 4, 5, 3, 30),
                None,
            ),
            (
                "Santiago September: 00:30 on Sunday does not exist, not yet at 04:29 UTC",
                &at_0030,
                &santiago,
                at(2026, 9, 5, 4, 30),
                at(2026, 9, 6, 4, 29),
                None,
            ),
            (
                "Santiago September: 00:30 does not exist, runs at 01:30 -03",
                &at_0030,
                &santiago,
                at(2026, 9, 5, 4, 30),
                at(2026, 9, 6, 4, 30),
                sync(at(2026, 9, 6, 4, 30)),
            ),
            (
                "Santiago September: the next day's 00:30 is at -03",
                &at_0030,
                &santiago,
                at(2026, 9, 6, 4, 30),
                at(2026, 9, 7, 3, 30),
                sync(at(2026, 9, 7, 3, 30)),
            ),
        ];
        for (name, policy, tz, last, now, expected) in cases {
            assert_eq!(
                due(policy, tz, &protected(Some(last)), now),
                expected,
                "{name}"
            );
        }
        // Views: the next 02:30 in Sydney after the April change is the AEST one.
        assert_eq!(
            next_wall_slot(&at_0230.recovery_points, &sydney, at(2026, 4, 4, 15, 30)),
            Some(at(2026, 4, 5, 16, 30))
        );
    }

    #[test]
    fn express_full_wins_its_slot() {
        let mut p = policy(SyncFrequency::EveryMinutes(60), &[(20, 0)]);
        p.express_full = Schedule {
            times: vec![TimeOfDay::hm(22, 0)],
            days: Weekdays { bits: 1 << 6 },
        };
        let sunday = at(2026, 6, 14, 22, 5);
        assert_eq!(
            due(
                &p,
                &TimeZone::UTC,
                &protected(Some(at(2026, 6, 14, 21, 0))),
                sunday
            ),
            Some(Due {
                kind: RunKind::ExpressFull,
                slot: at(2026, 6, 14, 22, 0)
            })
        );
        // Monday 22:05: no express full, an ordinary sync.
        let monday = at(2026, 6, 15, 22, 5);
        assert_eq!(
            due(
                &p,
                &TimeZone::UTC,
                &protected(Some(at(2026, 6, 15, 21, 0))),
                monday
            ),
            sync(at(2026, 6, 15, 22, 0))
        );
    }

    #[test]
    fn replica_creation_and_inconsistent_replicas() {
        let now = at(2026, 6, 10, 12, 0);
        let mut p = policy(SyncFrequency::EveryMinutes(60), &[(20, 0)]);
        let fresh = VmHistory {
            replica: ReplicaStatus::None,
            last_rp_request: None,
            last_check_request: None,
            active: false,
        };
        assert_eq!(
            due(&p, &TimeZone::UTC, &fresh, now).map(|d| d.kind),
            Some(RunKind::InitialReplication)
        );
        p.replica_creation = ReplicaCreation::At {
            unix_millis: now + 3_600_000,
        };
        assert_eq!(due(&p, &TimeZone::UTC, &fresh, now), None);
        assert!(due(&p, &TimeZone::UTC, &fresh, now + 3_600_000).is_some());
        p.replica_creation = ReplicaCreation::ManualSeed;
        assert_eq!(due(&p, &TimeZone::UTC, &fresh, now + 7_200_000), None);

        let since = now - 60_000;
        let inconsistent = VmHistory {
            replica: ReplicaStatus::InconsistentSince(since),
            last_rp_request: Some(now - 600_000),
            last_check_request: None,
            active: false,
        };
        // Automatic: a check at once, and no backup.
        assert_eq!(
            due(&p, &TimeZone::UTC, &inconsistent, now),
            Some(Due {
                kind: RunKind::ConsistencyCheck,
                slot: now
            })
        );
        // A check that failed is retried daily, not on every tick.
        let failed = VmHistory {
            last_check_request: Some(now - 1_000),
            ..inconsistent
        };
        assert_eq!(due(&p, &TimeZone::UTC, &failed, now), None);
        assert!(due(&p, &TimeZone::UTC, &failed, now + DAY_MS).is_some());
        // Window only: waits for the window, then once per opening.
        p.consistency_check = ConsistencyCheckPolicy {
            when_inconsistent: false,
            window: Some(ConsistencyCheckWindow {
                start: TimeOfDay::hm(22, 0),
                max_duration_minutes: 120,
                days: Weekdays::ALL,
            }),
        };
        assert_eq!(due(&p, &TimeZone::UTC, &inconsistent, now), None);
        let window_open = at(2026, 6, 10, 22, 30);
        assert_eq!(
            due(&p, &TimeZone::UTC, &inconsistent, window_open),
            Some(Due {
                kind: RunKind::ConsistencyCheck,
                slot: at(2026, 6, 10, 22, 0)
            })
        );
        let checked = VmHistory {
            last_check_request: Some(window_open),
            ..inconsistent
        };
        assert_eq!(
            due(&p, &TimeZone::UTC, &checked, window_open + 60_000),
            None
        );
        assert_eq!(
            due(&p, &TimeZone::UTC, &inconsistent, at(2026, 6, 11, 0, 0)),
            None,
            "window closed"
        );
        // Manual only: never.
        p.consistency_check.window = None;
        assert_eq!(due(&p, &TimeZone::UTC, &inconsistent, window_open), None);
    }

    #[test]
    fn next_slots_for_views() {
        let p = policy(SyncFrequency::EveryMinutes(15), &[(20, 0)]);
        let now = at(2026, 6, 10, 10, 7);
        assert_eq!(
            next_sync(&p, &TimeZone::UTC, now),
            Some(at(2026, 6, 10, 10, 15))
        );
        assert_eq!(
            next_wall_slot(&p.recovery_points, &TimeZone::UTC, now),
            Some(at(2026, 6, 10, 20, 0))
        );
    }
}
