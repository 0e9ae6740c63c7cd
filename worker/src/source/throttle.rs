//! Bandwidth throttling of restore writes: a [`Sink`] wrapper that paces `write_at` and
//! `write_zeroes` with a token bucket whose rate follows a work-hours schedule
//! ([`Throttle`]: one limit in work hours, another outside them). The work hours are wall
//! times of a zone ([`WorkSchedule`]): the throttle's fixed `utc_offset_minutes`, or a named
//! zone with its daylight-saving changes (jiff with its compiled-in time zone database, so a
//! node without /usr/share/zoneinfo reads the same rules as the orchestrator).
//!
//! The bucket ([`TokenBucket`]) is pure: it is given the time and the rate and answers how long
//! to wait, so it is tested with made-up time. Time and sleeping come from a [`PaceClock`]; the
//! wall clock ([`WallClock`]) in production, a manual one in tests.
//!
//! Must not: reorder or change writes, or sleep while the caller's cancel check says stop.

use cairn_schemas::v1::Throttle;
use jiff::Timestamp;
use jiff::tz::{Offset, TimeZone};

use super::{Error, Extent, Sink, Source};

/// A throttle's work hours with the zone their wall times are in.
#[derive(Debug, Clone)]
pub struct WorkSchedule {
    pub throttle: Throttle,
    zone: TimeZone,
}

impl WorkSchedule {
    /// Work hours at the throttle's fixed `utc_offset_minutes`.
    pub fn fixed(throttle: Throttle) -> WorkSchedule {
        let offset = Offset::from_seconds(i32::from(throttle.utc_offset_minutes) * 60)
            .unwrap_or(Offset::UTC);
        WorkSchedule {
            throttle,
            zone: TimeZone::fixed(offset),
        }
    }

    /// Work hours in `zone`: an IANA name (`Europe/Paris`) or a POSIX TZ rule, as
    /// `RestoreDiskInZone` carries it. A zone this worker cannot read (a name newer than its
    /// database) falls back to the fixed offset, which the orchestrator set to the zone's
    /// offset when the recovery was requested.
    pub fn in_zone(throttle: Throttle, zone: &str) -> WorkSchedule {
        match jiff::tz::db().get(zone).or_else(|_| TimeZone::posix(zone)) {
            Ok(zone) => WorkSchedule { throttle, zone },
            Err(err) => {
                tracing::warn!(
                    zone,
                    %err,
                    utc_offset_minutes = throttle.utc_offset_minutes,
                    "time zone of the throttle's work hours unknown here; using its fixed offset"
                );
                WorkSchedule::fixed(throttle)
            }
        }
    }

    /// Whether `unix_ms` falls in work hours (local wall time of the zone).
    pub fn is_work_time(&self, unix_ms: u64) -> bool {
        let at = Timestamp::from_millisecond(i64::try_from(unix_ms).unwrap_or(i64::MAX))
            .unwrap_or(Timestamp::MAX);
        let local = self.zone.to_datetime(at);
        let weekday = local.weekday().to_monday_zero_offset() as u8;
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        self.throttle.is_work_minute(weekday, minute)
    }

    /// The limit in force at `unix_ms`, in bytes per second (0 = unlimited).
    pub fn limit_at(&self, unix_ms: u64) -> u64 {
        if self.is_work_time(unix_ms) {
            self.throttle.work_bytes_per_sec
        } else {
            self.throttle.off_bytes_per_sec
        }
    }
}

/// Where a throttle gets the time (Unix milliseconds, for the work-hours schedule and the
/// bucket) and how it waits.
pub trait PaceClock: Send + Sync {
    fn now_ms(&self) -> u64;
    fn sleep_ms(&self, ms: u64);
}

/// The system clock and `thread::sleep`.
#[derive(Debug, Default, Clone, Copy)]
pub struct WallClock;

impl PaceClock for WallClock {
    #[allow(clippy::disallowed_methods)] // reason: the worker's one reading of the system clock
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn sleep_ms(&self, ms: u64) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// A token bucket in bytes. It holds at most one second of the current rate, so an idle
/// period never buys a long burst; a write larger than what it holds goes into debt and the
/// caller waits the debt off before the next write.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last_ms: Option<u64>,
}

impl Default for TokenBucket {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenBucket {
    pub fn new() -> TokenBucket {
        TokenBucket {
            tokens: 0.0,
            last_ms: None,
        }
    }

    /// Takes `bytes` at `now_ms` with the bucket filling at `rate` bytes per second (0 =
    /// unlimited). Returns how many milliseconds to wait *after* writing them.
    pub fn take(&mut self, bytes: u64, rate: u64, now_ms: u64) -> u64 {
        if rate == 0 {
            self.tokens = 0.0;
            self.last_ms = Some(now_ms);
            return 0;
        }
        let rate_f = rate as f64;
        let elapsed = self.last_ms.map_or(0, |t| now_ms.saturating_sub(t));
        self.last_ms = Some(now_ms);
        self.tokens = (self.tokens + elapsed as f64 * rate_f / 1000.0).min(rate_f);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            0
        } else {
            (-self.tokens * 1000.0 / rate_f).ceil() as u64
        }
    }
}

/// A sink whose writes are paced by a [`WorkSchedule`].
pub struct ThrottledSink<'a> {
    inner: Box<dyn Sink + 'a>,
    schedule: WorkSchedule,
    bucket: TokenBucket,
    clock: &'a dyn PaceClock,
    cancelled: &'a (dyn Fn() -> bool + Sync),
    /// Milliseconds spent waiting so far.
    pub waited_ms: u64,
}

impl<'a> ThrottledSink<'a> {
    pub fn new(
        inner: Box<dyn Sink + 'a>,
        schedule: WorkSchedule,
        clock: &'a dyn PaceClock,
        cancelled: &'a (dyn Fn() -> bool + Sync),
    ) -> ThrottledSink<'a> {
        ThrottledSink {
            inner,
            schedule,
            bucket: TokenBucket::new(),
            clock,
            cancelled,
            waited_ms: 0,
        }
    }

    fn pace(&mut self, bytes: u64) {
        let now = self.clock.now_ms();
        let rate = self.schedule.limit_at(now);
        let mut wait = self.bucket.take(bytes, rate, now);
        // Sleep in slices so a cancel is noticed soon.
        while wait > 0 && !(self.cancelled)() {
            let slice = wait.min(100);
            self.clock.sleep_ms(slice);
            self.waited_ms += slice;
            wait -= slice;
        }
    }
}

impl Source for ThrottledSink<'_> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        self.inner.extents(offset, len)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.inner.read_at(offset, buf)
    }

    fn describe(&self) -> String {
        format!("{} (throttled)", self.inner.describe())
    }

    fn recheck(&mut self) -> Result<(), Error> {
        self.inner.recheck()
    }
}

impl Sink for ThrottledSink<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.inner.write_at(offset, data)?;
        self.pace(data.len() as u64);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        self.inner.write_zeroes(offset, len)?;
        self.pace(len);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A clock that moves only when slept on (or when told to).
    struct ManualClock(Mutex<u64>);

    impl PaceClock for ManualClock {
        fn now_ms(&self) -> u64 {
            *self.0.lock().unwrap()
        }
        fn sleep_ms(&self, ms: u64) {
            *self.0.lock().unwrap() += ms;
        }
    }

    /// A sink in memory.
    struct MemSink(Vec<u8>);

    impl Source for MemSink {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
            Ok(vec![Extent {
                offset,
                len,
                kind: super::super::ExtentKind::Data,
            }])
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    impl Sink for MemSink {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
            self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Error> {
            self.0[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), Error> {
            Ok(())
        }
    }

    // 2026-01-05 was a Monday.
    const MONDAY_MIDNIGHT_UTC: u64 = 1_767_571_200_000;
    const HOUR: u64 = 3_600_000;

    fn schedule() -> Throttle {
        Throttle {
            work_bytes_per_sec: 1 << 20,
            off_bytes_per_sec: 4 << 20,
            work_days: Throttle::WEEKDAYS,
            work_start_minute: 8 * 60,
            work_end_minute: 18 * 60,
            utc_offset_minutes: 60,
        }
    }

    #[test]
    fn the_schedule_knows_work_hours_in_its_time_zone() {
        assert!(schedule().validate().is_ok());
        let s = WorkSchedule::fixed(schedule());
        // 07:30 UTC on Monday is 08:30 at UTC+1: work time.
        assert!(s.is_work_time(MONDAY_MIDNIGHT_UTC + 7 * HOUR + HOUR / 2));
        // 06:30 UTC is 07:30 local: not yet.
        assert!(!s.is_work_time(MONDAY_MIDNIGHT_UTC + 6 * HOUR + HOUR / 2));
        // 17:00 UTC is 18:00 local: the end is exclusive.
        assert!(!s.is_work_time(MONDAY_MIDNIGHT_UTC + 17 * HOUR));
        // Saturday 10:00 local.
        assert!(!s.is_work_time(MONDAY_MIDNIGHT_UTC + 5 * 24 * HOUR + 9 * HOUR));
        // Friday 10:00 local.
        assert!(s.is_work_time(MONDAY_MIDNIGHT_UTC + 4 * 24 * HOUR + 9 * HOUR));
        assert_eq!(s.limit_at(MONDAY_MIDNIGHT_UTC + 9 * HOUR), 1 << 20);
        assert_eq!(s.limit_at(MONDAY_MIDNIGHT_UTC + 20 * HOUR), 4 << 20);
        let mut bad = schedule();
        bad.work_end_minute = bad.work_start_minute;
        assert!(bad.validate().unwrap_err().contains("work_end_minute"));
    }

    fn utc_ms(text: &str) -> u64 {
        text.parse::<Timestamp>().unwrap().as_millisecond() as u64
    }

    #[test]
    fn work_hours_follow_a_named_zone_across_its_dst_changes() {
        // Europe/Paris, 08:00-18:00 Monday to Friday. Summer time begins on Sunday 29 March
        // 2026: on Friday 27 March work starts at 07:00 UTC, on Monday 30 March at 06:00 UTC.
        let paris = WorkSchedule::in_zone(schedule(), "Europe/Paris");
        let fixed = WorkSchedule::fixed(schedule());
        let cases = [
            ("2026-03-27T06:30Z", false, false),
            ("2026-03-27T07:00Z", true, true),
            ("2026-03-27T16:59Z", true, true),
            ("2026-03-27T17:00Z", false, false),
            // After the change the fixed +01:00 is an hour late; the zone is not.
            ("2026-03-30T06:30Z", true, false),
            ("2026-03-30T15:59Z", true, true),
            ("2026-03-30T16:00Z", false, true),
            // Autumn: back to +01:00 on Sunday 25 October.
            ("2026-10-23T06:00Z", true, false),
            ("2026-10-26T06:30Z", false, false),
            ("2026-10-26T07:00Z", true, true),
        ];
        for (at, in_paris, at_fixed_offset) in cases {
            assert_eq!(paris.is_work_time(utc_ms(at)), in_paris, "Paris at {at}");
            assert_eq!(
                fixed.is_work_time(utc_ms(at)),
                at_fixed_offset,
                "+01:00 at {at}"
            );
        }
        // Australia/Sydney: +11:00 until Sunday 5 April 2026, then +10:00.
        let sydney = WorkSchedule::in_zone(schedule(), "Australia/Sydney");
        assert!(
            sydney.is_work_time(utc_ms("2026-04-02T21:00Z")),
            "Fri 08:00 AEDT"
        );
        assert!(
            !sydney.is_work_time(utc_ms("2026-04-05T21:30Z")),
            "Mon 07:30 AEST"
        );
        assert!(
            sydney.is_work_time(utc_ms("2026-04-05T22:00Z")),
            "Mon 08:00 AEST"
        );
        // A POSIX rule (an older `+01:00/eu`-style zone) works too.
        let posix = WorkSchedule::in_zone(schedule(), "<STD>-1<DST>-2,M3.5.0/2,M10.5.0/3");
        assert!(posix.is_work_time(utc_ms("2026-03-30T06:30Z")));
        // An unknown zone falls back to the fixed offset.
        let unknown = WorkSchedule::in_zone(schedule(), "Mars/Olympus");
        assert!(!unknown.is_work_time(utc_ms("2026-03-30T06:30Z")));
        assert!(unknown.is_work_time(utc_ms("2026-03-30T07:00Z")));
    }

    #[test]
    fn the_bucket_holds_the_rate_and_no_long_burst() {
        let mut bucket = TokenBucket::new();
        // 1 MiB at 1 MiB/s from an empty bucket: wait one second after it.
        assert_eq!(bucket.take(1 << 20, 1 << 20, 0), 1000);
        // After waiting, the debt is paid; the next MiB waits again.
        assert_eq!(bucket.take(1 << 20, 1 << 20, 1000), 1000);
        // A long idle period fills at most one second's worth.
        assert_eq!(bucket.take(1 << 20, 1 << 20, 100_000), 0);
        assert_eq!(bucket.take(1 << 20, 1 << 20, 100_000), 1000);
        // Unlimited never waits.
        assert_eq!(bucket.take(u64::MAX / 2, 0, 100_001), 0);
    }

    #[test]
    fn writes_are_paced_by_the_limit_in_force() {
        for (start, rate) in [
            (MONDAY_MIDNIGHT_UTC + 9 * HOUR, 1u64 << 20),
            (MONDAY_MIDNIGHT_UTC + 20 * HOUR, 4 << 20),
        ] {
            let clock = ManualClock(Mutex::new(start));
            let never = || false;
            let mut sink = ThrottledSink::new(
                Box::new(MemSink(vec![0; 8 << 20])),
                WorkSchedule::fixed(schedule()),
                &clock,
                &never,
            );
            let block = vec![7u8; 256 << 10];
            for i in 0..32u64 {
                sink.write_at(i * block.len() as u64, &block).unwrap();
            }
            let elapsed = clock.now_ms() - start;
            let expected = (8u64 << 20) * 1000 / rate;
            assert!(
                elapsed.abs_diff(expected) <= 100,
                "8 MiB at {rate} B/s took {elapsed} ms of clock time, expected {expected}"
            );
            let mut back = vec![0u8; 256 << 10];
            sink.read_at(31 * (256 << 10), &mut back).unwrap();
            assert_eq!(back, block);
        }
    }

    #[test]
    fn a_cancel_stops_the_wait() {
        let clock = ManualClock(Mutex::new(MONDAY_MIDNIGHT_UTC + 9 * HOUR));
        let cancelled = || true;
        let mut sink = ThrottledSink::new(
            Box::new(MemSink(vec![0; 4 << 20])),
            WorkSchedule::fixed(schedule()),
            &clock,
            &cancelled,
        );
        sink.write_at(0, &vec![1u8; 4 << 20]).unwrap();
        assert_eq!(sink.waited_ms, 0);
    }
}
