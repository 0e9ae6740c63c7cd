//! A protection group's policy: retention, schedules, consistency checks, replica creation,
//! online protection, parallelism limits, and its validation.

use serde::{Deserialize, Serialize};

/// A time of day, in minutes since local midnight (0..1440).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TimeOfDay {
    /// Minutes since midnight, below 1440.
    pub minute_of_day: u16,
}

impl TimeOfDay {
    /// `hour:minute`; not validated here, see [`GroupPolicy::validate`].
    pub const fn hm(hour: u16, minute: u16) -> Self {
        Self {
            minute_of_day: hour * 60 + minute,
        }
    }
}

/// A set of weekdays: bit 0 = Monday ... bit 6 = Sunday.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Weekdays {
    /// The bit set; bit 7 must be clear.
    pub bits: u8,
}

impl Weekdays {
    /// Every day of the week.
    pub const ALL: Weekdays = Weekdays { bits: 0x7f };
    /// Monday to Friday.
    pub const WORKDAYS: Weekdays = Weekdays { bits: 0x1f };
    /// Saturday and Sunday.
    pub const WEEKEND: Weekdays = Weekdays { bits: 0x60 };

    /// Whether `day` (0 = Monday ... 6 = Sunday) is in the set.
    pub const fn contains(self, day: u8) -> bool {
        day < 7 && self.bits & (1 << day) != 0
    }
}

/// Times of day on some weekdays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Times of day, each below 24:00.
    pub times: Vec<TimeOfDay>,
    /// Days on which the times apply.
    pub days: Weekdays,
}

/// How often replicas are synchronized (incremental backups).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SyncFrequency {
    /// Every N minutes, N one of [`SyncFrequency::ALLOWED_MINUTES`].
    EveryMinutes(u16),
    /// Only just before each recovery point.
    JustBeforeRecoveryPoint,
}

impl SyncFrequency {
    /// The synchronization intervals MABS offers, in minutes.
    pub const ALLOWED_MINUTES: [u16; 9] = [15, 30, 45, 60, 120, 240, 360, 720, 1440];
}

/// A window in which scheduled consistency checks may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyCheckWindow {
    /// Start of the window.
    pub start: TimeOfDay,
    /// A check still running after this many minutes is stopped.
    pub max_duration_minutes: u32,
    /// Days on which the window opens.
    pub days: Weekdays,
}

/// When consistency checks run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyCheckPolicy {
    /// Run one automatically when a replica becomes inconsistent.
    pub when_inconsistent: bool,
    /// Run them in a scheduled window; `None` with `when_inconsistent == false` means manual
    /// only.
    pub window: Option<ConsistencyCheckWindow>,
}

/// When the first full copy (replica) is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicaCreation {
    /// As soon as the VM joins the group.
    Now,
    /// At a given time (Unix milliseconds).
    At {
        /// When to start.
        unix_millis: u64,
    },
    /// An administrator imports a seed made offline.
    ManualSeed,
}

/// Copies of recovery points to an offsite repository, with their own retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnlineProtection {
    /// Name of the offsite repository (Azure Blob / S3), as configured.
    pub repository: String,
    /// Daily copies are kept this many days (0 = none).
    pub daily_days: u16,
    /// Weekly copies are kept this many weeks (0 = none).
    pub weekly_weeks: u16,
    /// Monthly copies are kept this many months (0 = none).
    pub monthly_months: u16,
    /// Yearly copies are kept this many years (0 = none).
    pub yearly_years: u16,
}

/// Parallelism limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Limits {
    /// Backups running at once on one node.
    pub backups_per_node: u16,
    /// Backups running at once on one shared volume.
    pub backups_per_volume: u16,
    /// Recoveries running at once.
    pub recoveries: u16,
}

impl Default for Limits {
    /// MABS defaults: 3 backups per node, 8 parallel recoveries.
    fn default() -> Self {
        Self {
            backups_per_node: 3,
            backups_per_volume: 3,
            recoveries: 8,
        }
    }
}

/// Consistency level the group asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConsistencyWanted {
    /// Freeze the guest through its agent; fall back to crash consistency without one.
    ApplicationWithCrashFallback,
    /// Crash consistency only (no guest agent involved).
    CrashOnly,
}

/// A protection group's policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPolicy {
    /// Name of the repository the group's recovery points go to.
    pub repository: String,
    /// Recovery points are kept this many days (MABS offers 1-448).
    pub retention_days: u16,
    /// When recovery points are made.
    pub recovery_points: Schedule,
    /// How often replicas are synchronized in between.
    pub sync: SyncFrequency,
    /// When express full backups run (empty `times` = never).
    pub express_full: Schedule,
    /// Consistency checks.
    pub consistency_check: ConsistencyCheckPolicy,
    /// When the first replica is made.
    pub replica_creation: ReplicaCreation,
    /// Offsite copies, if any.
    pub online: Option<OnlineProtection>,
    /// Parallelism limits.
    pub limits: Limits,
    /// Consistency level wanted.
    pub consistency: ConsistencyWanted,
    /// Chunk size of the repository's disk indexes, in bytes (a power of two,
    /// 4 KiB-4 MiB; aligned with the change-tracking granularity).
    pub chunk_size: u32,
}

/// What is wrong with a [`GroupPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// `retention_days` is 0.
    #[error("retention_days must be at least 1")]
    ZeroRetention,
    /// A time of day is 24:00 or later.
    #[error("{field}: minute_of_day {minute_of_day} is not below 1440 (24:00)")]
    BadTime {
        /// Which schedule.
        field: &'static str,
        /// The rejected value.
        minute_of_day: u16,
    },
    /// A weekday set has bit 7 set.
    #[error(
        "{field}: weekday bits {bits:#04x} use bit 7, only bits 0 (Monday) to 6 (Sunday) exist"
    )]
    BadDays {
        /// Which schedule.
        field: &'static str,
        /// The rejected bits.
        bits: u8,
    },
    /// The recovery point schedule has no time or no day.
    #[error("recovery_points must name at least one time and one day")]
    NoRecoveryPoints,
    /// The synchronization interval is not one MABS offers.
    #[error(
        "sync: every {0} minutes is not allowed, use one of 15, 30, 45, 60, 120, 240, 360, 720, 1440"
    )]
    BadSyncFrequency(u16),
    /// A limit is 0.
    #[error("limits.{0} must be at least 1")]
    ZeroLimit(&'static str),
    /// The chunk size is not a power of two in range.
    #[error("chunk_size {0} must be a power of two from 4096 to 4194304")]
    BadChunkSize(u32),
    /// No repository named.
    #[error("repository must not be empty")]
    NoRepository,
    /// A consistency check window of zero minutes.
    #[error("consistency_check.window.max_duration_minutes must be at least 1")]
    EmptyWindow,
    /// A time of day appears twice in one schedule.
    #[error("{field}: {time} is listed twice")]
    DuplicateTime {
        /// Which schedule.
        field: &'static str,
        /// The repeated time, `HH:MM`.
        time: String,
    },
    /// Two recovery points are closer than one synchronization interval, so no
    /// synchronization would fall between them.
    #[error(
        "recovery points at {first} and {second} are {gap_minutes} minutes apart, but \
         synchronization runs every {sync_minutes} minutes: at least one synchronization must \
         fall between two recovery points (sync more often, or space the recovery points out)"
    )]
    NoSyncBetweenRecoveryPoints {
        /// The earlier recovery point, `HH:MM`.
        first: String,
        /// The later recovery point, `HH:MM`.
        second: String,
        /// Minutes between them.
        gap_minutes: u16,
        /// The synchronization interval.
        sync_minutes: u16,
    },
    /// A consistency check window longer than a day.
    #[error(
        "consistency_check.window.max_duration_minutes {0} is longer than a day (1440 minutes)"
    )]
    WindowTooLong(u32),
    /// Express full backups need a day when they have times, or times when they have days.
    #[error("express_full: times and days must both be set or both be empty")]
    HalfExpressFull,
    /// Replica creation at time zero.
    #[error("replica_creation: a start time of 0 is not a time; use `now` instead")]
    ZeroReplicaTime,
}

impl TimeOfDay {
    /// `HH:MM`.
    pub fn label(self) -> String {
        format!(
            "{:02}:{:02}",
            self.minute_of_day / 60,
            self.minute_of_day % 60
        )
    }
}

fn check_schedule(field: &'static str, schedule: &Schedule) -> Result<(), PolicyError> {
    if let Some(bad) = schedule.times.iter().find(|t| t.minute_of_day >= 1440) {
        return Err(PolicyError::BadTime {
            field,
            minute_of_day: bad.minute_of_day,
        });
    }
    if schedule.days.bits & 0x80 != 0 {
        return Err(PolicyError::BadDays {
            field,
            bits: schedule.days.bits,
        });
    }
    Ok(())
}

impl GroupPolicy {
    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.repository.is_empty() {
            return Err(PolicyError::NoRepository);
        }
        if self.retention_days == 0 {
            return Err(PolicyError::ZeroRetention);
        }
        check_schedule("recovery_points", &self.recovery_points)?;
        if self.recovery_points.times.is_empty() || self.recovery_points.days.bits == 0 {
            return Err(PolicyError::NoRecoveryPoints);
        }
        check_schedule("express_full", &self.express_full)?;
        for (field, schedule) in [
            ("recovery_points", &self.recovery_points),
            ("express_full", &self.express_full),
        ] {
            let mut times = schedule.times.clone();
            times.sort();
            if let Some(pair) = times.windows(2).find(|w| w[0] == w[1]) {
                return Err(PolicyError::DuplicateTime {
                    field,
                    time: pair[0].label(),
                });
            }
        }
        if self.express_full.times.is_empty() != (self.express_full.days.bits == 0) {
            return Err(PolicyError::HalfExpressFull);
        }
        if let SyncFrequency::EveryMinutes(minutes) = self.sync {
            if !SyncFrequency::ALLOWED_MINUTES.contains(&minutes) {
                return Err(PolicyError::BadSyncFrequency(minutes));
            }
            self.check_sync_between_recovery_points(minutes)?;
        }
        if matches!(
            self.replica_creation,
            ReplicaCreation::At { unix_millis: 0 }
        ) {
            return Err(PolicyError::ZeroReplicaTime);
        }
        if let Some(window) = &self.consistency_check.window {
            check_schedule(
                "consistency_check.window",
                &Schedule {
                    times: vec![window.start],
                    days: window.days,
                },
            )?;
            if window.max_duration_minutes == 0 {
                return Err(PolicyError::EmptyWindow);
            }
            if window.max_duration_minutes > 1440 {
                return Err(PolicyError::WindowTooLong(window.max_duration_minutes));
            }
        }
        for (name, value) in [
            ("backups_per_node", self.limits.backups_per_node),
            ("backups_per_volume", self.limits.backups_per_volume),
            ("recoveries", self.limits.recoveries),
        ] {
            if value == 0 {
                return Err(PolicyError::ZeroLimit(name));
            }
        }
        if !self.chunk_size.is_power_of_two() || !(4096..=4 << 20).contains(&self.chunk_size) {
            return Err(PolicyError::BadChunkSize(self.chunk_size));
        }
        Ok(())
    }

    /// MABS's rule: at least one synchronization must fall between two scheduled recovery
    /// points, so consecutive recovery point times (also across midnight, when the next day
    /// has recovery points too) must be at least one interval apart.
    fn check_sync_between_recovery_points(&self, sync_minutes: u16) -> Result<(), PolicyError> {
        let mut times = self.recovery_points.times.clone();
        times.sort();
        let mut pairs: Vec<(TimeOfDay, TimeOfDay, u16)> = times
            .windows(2)
            .map(|w| (w[0], w[1], w[1].minute_of_day - w[0].minute_of_day))
            .collect();
        if let (Some(first), Some(last)) = (times.first(), times.last()) {
            // Across midnight only matters when recovery points run on consecutive days.
            let consecutive_days = (0..7u8).any(|d| {
                self.recovery_points.days.contains(d)
                    && self.recovery_points.days.contains((d + 1) % 7)
            });
            if consecutive_days {
                pairs.push((
                    *last,
                    *first,
                    1440 - last.minute_of_day + first.minute_of_day,
                ));
            }
        }
        match pairs.into_iter().find(|(_, _, gap)| *gap < sync_minutes) {
            Some((first, second, gap)) => Err(PolicyError::NoSyncBetweenRecoveryPoints {
                first: first.label(),
                second: second.label(),
                gap_minutes: gap,
                sync_minutes,
            }),
            None => Ok(()),
        }
    }

    /// A policy with MABS-like defaults writing to `repository`: 5 days of retention, a
    /// recovery point at 20:00 every day, synchronization every 15 minutes, an express full
    /// on Sundays at 22:00, automatic consistency checks, replica now, crash-consistent
    /// fallback, 64 KiB chunks.
    pub fn with_defaults(repository: impl Into<String>) -> Self {
        Self {
            repository: repository.into(),
            retention_days: 5,
            recovery_points: Schedule {
                times: vec![TimeOfDay::hm(20, 0)],
                days: Weekdays::ALL,
            },
            sync: SyncFrequency::EveryMinutes(15),
            express_full: Schedule {
                times: vec![TimeOfDay::hm(22, 0)],
                days: Weekdays { bits: 1 << 6 },
            },
            consistency_check: ConsistencyCheckPolicy {
                when_inconsistent: true,
                window: None,
            },
            replica_creation: ReplicaCreation::Now,
            online: None,
            limits: Limits::default(),
            consistency: ConsistencyWanted::ApplicationWithCrashFallback,
            chunk_size: 64 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(GroupPolicy::with_defaults("local").validate(), Ok(()));
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = GroupPolicy::with_defaults("local");
        type Change = Box<dyn Fn(&mut GroupPolicy)>;
        let cases: Vec<(Change, PolicyError)> = vec![
            (
                Box::new(|p| p.retention_days = 0),
                PolicyError::ZeroRetention,
            ),
            (
                Box::new(|p| p.repository.clear()),
                PolicyError::NoRepository,
            ),
            (
                Box::new(|p| p.sync = SyncFrequency::EveryMinutes(20)),
                PolicyError::BadSyncFrequency(20),
            ),
            (
                Box::new(|p| p.recovery_points.times = vec![TimeOfDay::hm(24, 0)]),
                PolicyError::BadTime {
                    field: "recovery_points",
                    minute_of_day: 1440,
                },
            ),
            (
                Box::new(|p| p.recovery_points.times.clear()),
                PolicyError::NoRecoveryPoints,
            ),
            (
                Box::new(|p| p.express_full.days = Weekdays { bits: 0x80 }),
                PolicyError::BadDays {
                    field: "express_full",
                    bits: 0x80,
                },
            ),
            (
                Box::new(|p| p.limits.recoveries = 0),
                PolicyError::ZeroLimit("recoveries"),
            ),
            (
                Box::new(|p| p.chunk_size = 65_000),
                PolicyError::BadChunkSize(65_000),
            ),
            (
                Box::new(|p| p.chunk_size = 8 << 20),
                PolicyError::BadChunkSize(8 << 20),
            ),
            (
                Box::new(|p| {
                    p.consistency_check.window = Some(ConsistencyCheckWindow {
                        start: TimeOfDay::hm(1, 0),
                        max_duration_minutes: 0,
                        days: Weekdays::WEEKEND,
                    })
                }),
                PolicyError::EmptyWindow,
            ),
        ];
        let no_sync = |p: &mut GroupPolicy| {
            p.sync = SyncFrequency::EveryMinutes(45);
            p.recovery_points.times = vec![TimeOfDay::hm(13, 0), TimeOfDay::hm(13, 30)];
        };
        let cases: Vec<(Change, PolicyError)> = cases
            .into_iter()
            .chain([
                (
                    Box::new(no_sync) as Change,
                    PolicyError::NoSyncBetweenRecoveryPoints {
                        first: "13:00".into(),
                        second: "13:30".into(),
                        gap_minutes: 30,
                        sync_minutes: 45,
                    },
                ),
                (
                    // Daily sync with two recovery points a day: the 23:00 → 01:00 gap fails
                    // first in time order (01:00 → 23:00 is 22 hours, under 24 too).
                    Box::new(|p: &mut GroupPolicy| {
                        p.sync = SyncFrequency::EveryMinutes(1440);
                        p.recovery_points.times = vec![TimeOfDay::hm(1, 0), TimeOfDay::hm(23, 0)];
                    }),
                    PolicyError::NoSyncBetweenRecoveryPoints {
                        first: "01:00".into(),
                        second: "23:00".into(),
                        gap_minutes: 1320,
                        sync_minutes: 1440,
                    },
                ),
                (
                    // Across midnight: 23:50 and 00:05 the next day.
                    Box::new(|p: &mut GroupPolicy| {
                        p.sync = SyncFrequency::EveryMinutes(30);
                        p.recovery_points.times = vec![TimeOfDay::hm(0, 5), TimeOfDay::hm(23, 50)];
                    }),
                    PolicyError::NoSyncBetweenRecoveryPoints {
                        first: "23:50".into(),
                        second: "00:05".into(),
                        gap_minutes: 15,
                        sync_minutes: 30,
                    },
                ),
                (
                    Box::new(|p: &mut GroupPolicy| {
                        p.recovery_points.times = vec![TimeOfDay::hm(8, 0), TimeOfDay::hm(8, 0)];
                    }),
                    PolicyError::DuplicateTime {
                        field: "recovery_points",
                        time: "08:00".into(),
                    },
                ),
                (
                    Box::new(|p: &mut GroupPolicy| p.express_full.days = Weekdays { bits: 0 }),
                    PolicyError::HalfExpressFull,
                ),
                (
                    Box::new(|p: &mut GroupPolicy| {
                        p.replica_creation = ReplicaCreation::At { unix_millis: 0 }
                    }),
                    PolicyError::ZeroReplicaTime,
                ),
                (
                    Box::new(|p: &mut GroupPolicy| {
                        p.consistency_check.window = Some(ConsistencyCheckWindow {
                            start: TimeOfDay::hm(1, 0),
                            max_duration_minutes: 1441,
                            days: Weekdays::ALL,
                        })
                    }),
                    PolicyError::WindowTooLong(1441),
                ),
            ])
            .collect();
        for (change, expected) in cases {
            let mut policy = base.clone();
            change(&mut policy);
            assert_eq!(policy.validate(), Err(expected));
        }
    }

    #[test]
    fn sync_just_before_recovery_points_allows_close_recovery_points() {
        let mut policy = GroupPolicy::with_defaults("local");
        policy.sync = SyncFrequency::JustBeforeRecoveryPoint;
        policy.recovery_points.times = vec![TimeOfDay::hm(13, 0), TimeOfDay::hm(13, 30)];
        assert_eq!(policy.validate(), Ok(()));
        // One recovery point a day on weekdays only: no pair across midnight on Friday.
        policy.sync = SyncFrequency::EveryMinutes(1440);
        policy.recovery_points.times = vec![TimeOfDay::hm(20, 0)];
        assert_eq!(policy.validate(), Ok(()));
    }

    #[test]
    fn weekdays() {
        assert!(Weekdays::WORKDAYS.contains(0));
        assert!(!Weekdays::WORKDAYS.contains(5));
        assert!(Weekdays::WEEKEND.contains(6));
        assert!(!Weekdays::ALL.contains(7));
    }
}
