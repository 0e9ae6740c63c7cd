//! The time zone that protection-group schedules (and the displayed times of the calendar)
//! are written in, backed by jiff and its compiled-in copy of the IANA time zone database: any
//! IANA name (`Europe/Paris`, `Australia/Sydney`, `America/Santiago`), `UTC`, or a fixed offset
//! (`+02:00`, `-05:30`). So "20:00 every day" means 20:00 on the administrator's wall clock all
//! year round, on hosts with or without /usr/share/zoneinfo.
//!
//! The older forms `+HH:MM/eu` and `+HH:MM/us` (an offset with the EU's or the US's
//! daylight-saving rule) are still read: an offset that stood for a zone is that zone
//! (`+01:00/eu` is Europe/Berlin, `-05:00/us` America/New_York), any other becomes the same
//! rule as a POSIX TZ rule and is shown as written.
//!
//! Conversions from wall time to UTC follow the usual conventions (jiff's "compatible"
//! disambiguation, as in RFC 5545): a wall time that does not exist (skipped by the spring
//! change, e.g. 02:30 in Berlin on the last Sunday of March) runs at the same distance after
//! the change (03:30 summer time); a wall time that happens twice (the autumn change) runs at
//! its first occurrence only.
//!
//! Owns: parsing and naming zones, local dates and times, the `YYYY-MM-DDTHH:MMZ` form of
//! messages. Civil-date arithmetic is jiff's; there is no other copy. Must not read the system
//! clock or the system's time zone: the zone is configuration, time is a parameter.

use std::fmt;

use jiff::civil::{Date, Time};
use jiff::tz::{self, Offset};
use jiff::{Timestamp, ToSpan};

/// A daylight-saving rule of the older `+HH:MM/eu|us` form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DstRule {
    /// European Union: last Sunday of March 01:00 UTC to last Sunday of October 01:00 UTC.
    Eu,
    /// United States: second Sunday of March 02:00 local to first Sunday of November 02:00
    /// local (summer time).
    Us,
}

/// A time zone for schedules and displayed times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeZone {
    zone: tz::TimeZone,
    /// The standard offset (minutes) and rule of an older `+HH:MM/eu|us` zone that no IANA
    /// name stands for; it is shown as written.
    legacy: Option<(i32, DstRule)>,
}

/// A zone name that [`TimeZone::parse`] does not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "time zone {0:?} is not understood: use UTC, an IANA time zone name like Europe/Paris, \
     Australia/Sydney or America/New_York, or a fixed offset like +02:00 or -05:30"
)]
pub struct Error(pub String);

/// Old `+HH:MM/rule` forms that stood for a zone, and the zone (the name the old parser
/// showed them as).
const LEGACY_NAMES: &[(i32, DstRule, &str)] = &[
    (0, DstRule::Eu, "Europe/London"),
    (60, DstRule::Eu, "Europe/Berlin"),
    (120, DstRule::Eu, "Europe/Helsinki"),
    (-300, DstRule::Us, "America/New_York"),
    (-360, DstRule::Us, "America/Chicago"),
    (-420, DstRule::Us, "America/Denver"),
    (-480, DstRule::Us, "America/Los_Angeles"),
];

impl Default for TimeZone {
    fn default() -> Self {
        TimeZone::UTC
    }
}

impl TimeZone {
    /// Coordinated Universal Time.
    pub const UTC: TimeZone = TimeZone {
        zone: tz::TimeZone::UTC,
        legacy: None,
    };

    /// Parses `UTC`, `Z`, `+HH:MM`, `-HH:MM`, an IANA name (any case), or the older
    /// `+HH:MM/eu` and `+HH:MM/us`.
    pub fn parse(text: &str) -> Result<TimeZone, Error> {
        let bad = || Error(text.to_owned());
        let trimmed = text.trim();
        if trimmed.eq_ignore_ascii_case("utc") || trimmed == "Z" {
            return Ok(TimeZone::UTC);
        }
        if let Some((head, rule)) = trimmed.split_once('/')
            && (head.eq_ignore_ascii_case("utc") || head == "Z")
        {
            // The old parser read `UTC/eu` as `+00:00/eu`.
            return match rule.to_ascii_lowercase().as_str() {
                "eu" => legacy(0, DstRule::Eu).ok_or_else(bad),
                "us" => legacy(0, DstRule::Us).ok_or_else(bad),
                _ => Err(bad()),
            };
        }
        if let Some(rest) = trimmed.strip_prefix(['+', '-']) {
            let (offset, rule) = match rest.split_once('/') {
                Some((offset, rule)) => (offset, Some(rule)),
                None => (rest, None),
            };
            let sign = if trimmed.starts_with('-') { -1 } else { 1 };
            let minutes = sign * parse_hh_mm(offset).ok_or_else(bad)?;
            return match rule.map(str::to_ascii_lowercase).as_deref() {
                None => Ok(TimeZone::fixed(minutes)),
                Some("eu") => legacy(minutes, DstRule::Eu).ok_or_else(bad),
                Some("us") => legacy(minutes, DstRule::Us).ok_or_else(bad),
                Some(_) => Err(bad()),
            };
        }
        // Only names that look like IANA names reach the database (no POSIX rules, no paths).
        let plausible = !trimmed.is_empty()
            && !trimmed.starts_with('/')
            && !trimmed.contains("..")
            && trimmed
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_-+".contains(&b));
        if !plausible {
            return Err(bad());
        }
        let zone = tz::db().get(trimmed).map_err(|_| bad())?;
        Ok(TimeZone { zone, legacy: None })
    }

    /// A zone at a fixed offset from UTC, in minutes east.
    pub fn fixed(offset_minutes: i32) -> TimeZone {
        if offset_minutes == 0 {
            return TimeZone::UTC;
        }
        let offset = Offset::from_seconds(offset_minutes * 60).unwrap_or(Offset::UTC);
        TimeZone {
            zone: tz::TimeZone::fixed(offset),
            legacy: None,
        }
    }

    /// How a recovery throttle carries this zone to the worker (`RestoreDiskInZone`): its
    /// IANA name, or the POSIX TZ rule of an older `+HH:MM/eu|us` form. `None` for UTC and
    /// fixed offsets, which the throttle's `utc_offset_minutes` already says.
    pub fn wire_name(&self) -> Option<String> {
        if let Some((std_offset, rule)) = self.legacy {
            return Some(legacy_posix(std_offset, rule));
        }
        if self.zone.to_fixed_offset().is_ok() {
            return None;
        }
        self.zone.iana_name().map(str::to_owned)
    }

    /// The jiff zone of a [`TimeZone::wire_name`]: an IANA name or a POSIX TZ rule.
    pub fn jiff_from_wire(name: &str) -> Result<tz::TimeZone, Error> {
        if let Ok(zone) = TimeZone::parse(name) {
            return Ok(zone.zone);
        }
        tz::TimeZone::posix(name).map_err(|_| Error(name.to_owned()))
    }

    /// The jiff zone, for callers that format or compute with jiff directly.
    pub fn jiff(&self) -> &tz::TimeZone {
        &self.zone
    }

    /// The offset from UTC in force at `utc_ms`, in minutes east.
    pub fn offset_at(&self, utc_ms: i64) -> i32 {
        self.zone.to_offset(timestamp(utc_ms)).seconds() / 60
    }

    /// The zone's standard offset in the year of `utc_ms`, in minutes east: the smaller of
    /// its offsets on 1 January and 1 July (summer time is ahead of standard time in both
    /// hemispheres). Grids of elapsed time are anchored on it, so a DST change moves none of
    /// their slots.
    pub fn standard_offset_minutes(&self, utc_ms: i64) -> i32 {
        let year = timestamp(utc_ms).to_zoned(tz::TimeZone::UTC).year();
        [1, 7]
            .into_iter()
            .filter_map(|month| Date::new(year, month, 1).ok())
            .filter_map(|date| date.to_zoned(tz::TimeZone::UTC).ok())
            .map(|zoned| self.zone.to_offset(zoned.timestamp()).seconds() / 60)
            .min()
            .unwrap_or(0)
    }

    /// The wall-clock date and minute of day at `utc_ms`.
    pub fn local(&self, utc_ms: i64) -> (Date, u16) {
        let civil = self.zone.to_datetime(timestamp(utc_ms));
        let minute = civil.hour() as u16 * 60 + civil.minute() as u16;
        (civil.date(), minute)
    }

    /// The UTC instant (Unix ms) of wall time `minute_of_day` on local date `day`. Skipped wall
    /// times move forward by the change; repeated ones take the first occurrence. `None` only
    /// outside jiff's range of years (-9999 to 9999) or for a minute past the day.
    pub fn to_utc(&self, day: Date, minute_of_day: u16) -> Option<i64> {
        let time = Time::new(
            i8::try_from(minute_of_day / 60).ok()?,
            i8::try_from(minute_of_day % 60).ok()?,
            0,
            0,
        )
        .ok()?;
        self.zone
            .to_ambiguous_timestamp(day.to_datetime(time))
            .compatible()
            .ok()
            .map(|ts| ts.as_millisecond())
    }
}

fn parse_hh_mm(text: &str) -> Option<i32> {
    let (hours, minutes) = text.split_once(':')?;
    let two_digits = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
    if !two_digits(hours) || !two_digits(minutes) {
        return None;
    }
    let (hours, minutes): (i32, i32) = (hours.parse().ok()?, minutes.parse().ok()?);
    (hours <= 14 && minutes < 60).then_some(hours * 60 + minutes)
}

/// The POSIX TZ rule of an older `+HH:MM/eu|us` form.
fn legacy_posix(std_offset: i32, rule: DstRule) -> String {
    // POSIX writes offsets west of UTC and the change times in local time: standard time for
    // the start, summer time for the end.
    let hh_mm = |minutes: i32| {
        let sign = if minutes < 0 { "-" } else { "" };
        let abs = minutes.abs();
        format!("{sign}{}:{:02}", abs / 60, abs % 60)
    };
    let rules = match rule {
        // 01:00 UTC both ways.
        DstRule::Eu => format!(
            "M3.5.0/{},M10.5.0/{}",
            hh_mm(60 + std_offset),
            hh_mm(120 + std_offset)
        ),
        DstRule::Us => "M3.2.0/2,M11.1.0/2".to_owned(),
    };
    format!(
        "<STD>{}<DST>{},{rules}",
        hh_mm(-std_offset),
        hh_mm(-std_offset - 60)
    )
}

/// The zone of an older `+HH:MM/eu|us` form: the IANA zone it stood for, or the same rule as
/// a POSIX TZ rule.
fn legacy(std_offset: i32, rule: DstRule) -> Option<TimeZone> {
    if let Some((_, _, name)) = LEGACY_NAMES
        .iter()
        .find(|(offset, r, _)| *offset == std_offset && *r == rule)
    {
        let zone = tz::db().get(name).ok()?;
        return Some(TimeZone { zone, legacy: None });
    }
    let posix = legacy_posix(std_offset, rule);
    let zone = tz::TimeZone::posix(&posix).ok()?;
    Some(TimeZone {
        zone,
        legacy: Some((std_offset, rule)),
    })
}

impl fmt::Display for TimeZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((std_offset, rule)) = self.legacy {
            write_offset(f, std_offset)?;
            return f.write_str(match rule {
                DstRule::Eu => "/eu",
                DstRule::Us => "/us",
            });
        }
        if let Some(name) = self.zone.iana_name() {
            return f.write_str(name);
        }
        match self.zone.to_fixed_offset() {
            Ok(offset) if offset == Offset::UTC => f.write_str("UTC"),
            Ok(offset) => write_offset(f, offset.seconds() / 60),
            Err(_) => f.write_str("UTC"),
        }
    }
}

fn write_offset(f: &mut fmt::Formatter<'_>, minutes: i32) -> fmt::Result {
    let sign = if minutes < 0 { '-' } else { '+' };
    let abs = minutes.abs();
    write!(f, "{sign}{:02}:{:02}", abs / 60, abs % 60)
}

/// The jiff timestamp of Unix milliseconds, clamped to jiff's range.
pub fn timestamp(unix_ms: i64) -> Timestamp {
    Timestamp::from_millisecond(unix_ms).unwrap_or(if unix_ms < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    })
}

/// Day of the week of a date: 0 = Monday ... 6 = Sunday (the bit of [`cairn_schemas::Weekdays`]).
pub fn weekday(day: Date) -> u8 {
    day.weekday().to_monday_zero_offset() as u8
}

/// `day` plus `n` days (negative: earlier), or `None` outside jiff's range.
pub fn add_days(day: Date, n: i64) -> Option<Date> {
    day.checked_add(n.days()).ok()
}

/// `YYYY-MM-DDTHH:MMZ` of a Unix time in milliseconds (UTC), for messages.
pub fn rfc3339_utc(unix_ms: u64) -> String {
    timestamp(i64::try_from(unix_ms).unwrap_or(i64::MAX))
        .strftime("%Y-%m-%dT%H:%MZ")
        .to_string()
}

/// The Unix milliseconds of midnight UTC starting `date`, for tests and tables.
pub fn utc_midnight_ms(date: Date) -> i64 {
    date.to_zoned(tz::TimeZone::UTC)
        .map_or(0, |z| z.timestamp().as_millisecond())
}

#[cfg(test)]
mod tests {
    use jiff::civil::date;

    use super::*;

    const MINUTE_MS: i64 = 60_000;

    fn utc(y: i16, mo: i8, d: i8, h: i64, mi: i64) -> i64 {
        utc_midnight_ms(date(y, mo, d)) + h * 3_600_000 + mi * MINUTE_MS
    }

    #[test]
    fn rfc3339_of_unix_millis() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00Z");
        assert_eq!(
            rfc3339_utc(1_767_225_600_000 + 90_061_000),
            "2026-01-02T01:01Z"
        );
    }

    #[test]
    fn weekdays_and_day_steps() {
        assert_eq!(weekday(date(1970, 1, 1)), 3, "1970-01-01 was a Thursday");
        assert_eq!(weekday(date(2026, 11, 28)), 5, "a Saturday");
        assert_eq!(add_days(date(2024, 2, 28), 1), Some(date(2024, 2, 29)));
        assert_eq!(add_days(date(2026, 1, 1), -1), Some(date(2025, 12, 31)));
        assert_eq!(utc_midnight_ms(date(1970, 1, 2)), 86_400_000);
    }

    #[test]
    fn parse_and_display() {
        // (input, shown as, offset in January 2026, offset in July 2026)
        let cases = [
            ("UTC", "UTC", 0, 0),
            ("Z", "UTC", 0, 0),
            ("UTC/eu", "Europe/London", 0, 60),
            ("+00:00", "UTC", 0, 0),
            ("+02:00", "+02:00", 120, 120),
            ("-05:30", "-05:30", -330, -330),
            ("+01:00/eu", "Europe/Berlin", 60, 120),
            ("europe/berlin", "Europe/Berlin", 60, 120),
            ("Europe/Paris", "Europe/Paris", 60, 120),
            ("-05:00/US", "America/New_York", -300, -240),
            ("+03:00/eu", "+03:00/eu", 180, 240),
            ("-03:30/us", "-03:30/us", -210, -150),
            ("Australia/Sydney", "Australia/Sydney", 660, 600),
            ("Pacific/Auckland", "Pacific/Auckland", 780, 720),
            ("America/Santiago", "America/Santiago", -180, -240),
            ("Asia/Kolkata", "Asia/Kolkata", 330, 330),
        ];
        let january = utc(2026, 1, 15, 12, 0);
        let july = utc(2026, 7, 15, 12, 0);
        for (text, shown, winter, summer) in cases {
            let zone = TimeZone::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(zone.to_string(), shown, "{text}");
            assert_eq!(zone.offset_at(january), winter, "{text} in January");
            assert_eq!(zone.offset_at(july), summer, "{text} in July");
            // What is shown parses back to the same zone.
            assert_eq!(TimeZone::parse(shown).unwrap(), zone, "{text}");
        }
        for bad in [
            "",
            "+2",
            "+02:60",
            "+15:00",
            "+01:00/xx",
            "Mars/Olympus",
            "Europe/Pariss",
            "../../etc/passwd",
            "/usr/share/zoneinfo/UTC",
            "EST5EDT,M3.2.0,M11.1.0",
        ] {
            let err = TimeZone::parse(bad).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(&format!("{bad:?}")), "{message}");
            assert!(message.contains("Europe/Paris"), "{message}");
        }
    }

    #[test]
    fn wire_names_carry_the_rules() {
        let instants = [
            utc(2026, 1, 15, 12, 0),
            utc(2026, 3, 29, 0, 59),
            utc(2026, 3, 29, 1, 0),
            utc(2026, 7, 15, 12, 0),
            utc(2026, 10, 25, 1, 0),
        ];
        for text in [
            "Europe/Paris",
            "Australia/Sydney",
            "+03:00/eu",
            "-03:30/us",
            "-05:00/eu",
        ] {
            let zone = TimeZone::parse(text).unwrap();
            let wire = zone.wire_name().unwrap();
            let back = TimeZone::jiff_from_wire(&wire).unwrap();
            for at in instants {
                assert_eq!(
                    back.to_offset(timestamp(at)).seconds() / 60,
                    zone.offset_at(at),
                    "{text} as {wire}"
                );
            }
        }
        assert_eq!(
            TimeZone::parse("Europe/Paris")
                .unwrap()
                .wire_name()
                .unwrap(),
            "Europe/Paris"
        );
        assert_eq!(TimeZone::UTC.wire_name(), None);
        assert_eq!(TimeZone::parse("+02:00").unwrap().wire_name(), None);
        assert!(TimeZone::jiff_from_wire("Mars/Olympus").is_err());
    }

    #[test]
    fn standard_offsets_in_both_hemispheres() {
        let now = utc(2026, 3, 1, 0, 0);
        for (name, standard) in [
            ("Europe/Paris", 60),
            ("Australia/Sydney", 600),
            ("America/Santiago", -240),
            ("UTC", 0),
            ("+05:30", 330),
        ] {
            let zone = TimeZone::parse(name).unwrap();
            assert_eq!(zone.standard_offset_minutes(now), standard, "{name}");
        }
    }

    #[test]
    fn legacy_rules_change_at_the_old_instants() {
        // +03:00/eu: the EU's instants, 01:00 UTC on the last Sundays of March and October.
        let zone = TimeZone::parse("+03:00/eu").unwrap();
        assert_eq!(zone.offset_at(utc(2026, 3, 29, 0, 59)), 180);
        assert_eq!(zone.offset_at(utc(2026, 3, 29, 1, 0)), 240);
        assert_eq!(zone.offset_at(utc(2026, 10, 25, 0, 59)), 240);
        assert_eq!(zone.offset_at(utc(2026, 10, 25, 1, 0)), 180);
        // -03:30/us: 02:00 local on the second Sunday of March and the first of November.
        let zone = TimeZone::parse("-03:30/us").unwrap();
        assert_eq!(zone.offset_at(utc(2026, 3, 8, 5, 29)), -210);
        assert_eq!(zone.offset_at(utc(2026, 3, 8, 5, 30)), -150);
        assert_eq!(zone.offset_at(utc(2026, 11, 1, 4, 29)), -150);
        assert_eq!(zone.offset_at(utc(2026, 11, 1, 4, 30)), -210);
    }

    #[test]
    fn eu_and_us_changes_happen_at_the_right_instants() {
        let berlin = TimeZone::parse("Europe/Berlin").unwrap();
        // 2026: summer time from 29 March 01:00 UTC to 25 October 01:00 UTC.
        assert_eq!(berlin.offset_at(utc(2026, 3, 29, 0, 59)), 60);
        assert_eq!(berlin.offset_at(utc(2026, 3, 29, 1, 0)), 120);
        assert_eq!(berlin.offset_at(utc(2026, 10, 25, 0, 59)), 120);
        assert_eq!(berlin.offset_at(utc(2026, 10, 25, 1, 0)), 60);
        let new_york = TimeZone::parse("America/New_York").unwrap();
        // 2026: 8 March 02:00 EST (07:00 UTC) to 1 November 02:00 EDT (06:00 UTC).
        assert_eq!(new_york.offset_at(utc(2026, 3, 8, 6, 59)), -300);
        assert_eq!(new_york.offset_at(utc(2026, 3, 8, 7, 0)), -240);
        assert_eq!(new_york.offset_at(utc(2026, 11, 1, 5, 59)), -240);
        assert_eq!(new_york.offset_at(utc(2026, 11, 1, 6, 0)), -300);
    }

    #[test]
    fn skipped_and_repeated_wall_times() {
        let berlin = TimeZone::parse("Europe/Berlin").unwrap();
        let spring = date(2026, 3, 29);
        let autumn = date(2026, 10, 25);
        // (local day, wall minute, expected UTC)
        let cases = [
            (spring, 60, utc(2026, 3, 29, 0, 0)),    // 01:00 CET
            (spring, 150, utc(2026, 3, 29, 1, 30)),  // 02:30 does not exist: 03:30 CEST
            (spring, 180, utc(2026, 3, 29, 1, 0)),   // 03:00 CEST
            (autumn, 150, utc(2026, 10, 25, 0, 30)), // 02:30 twice: the first (CEST)
            (autumn, 200, utc(2026, 10, 25, 2, 20)), // 03:20 CET
            (autumn, 20 * 60, utc(2026, 10, 25, 19, 0)),
        ];
        for (day, minute, expected) in cases {
            assert_eq!(
                berlin.to_utc(day, minute),
                Some(expected),
                "{day} minute {minute}"
            );
        }
        assert_eq!(
            berlin.local(utc(2026, 7, 1, 18, 0)),
            (date(2026, 7, 1), 20 * 60)
        );
        assert_eq!(berlin.to_utc(spring, 1440), None);
    }

    #[test]
    fn southern_hemisphere_changes() {
        // Australia/Sydney 2026: summer time ends on the first Sunday of April (5 April,
        // 03:00 AEDT -> 02:00 AEST, 16:00 UTC the day before) and starts on the first
        // Sunday of October (4 October, 02:00 AEST -> 03:00 AEDT, 16:00 UTC the day before).
        let sydney = TimeZone::parse("Australia/Sydney").unwrap();
        assert_eq!(sydney.offset_at(utc(2026, 4, 4, 15, 59)), 660);
        assert_eq!(sydney.offset_at(utc(2026, 4, 4, 16, 0)), 600);
        assert_eq!(sydney.offset_at(utc(2026, 10, 3, 15, 59)), 600);
        assert_eq!(sydney.offset_at(utc(2026, 10, 3, 16, 0)), 660);
        // 02:30 on 5 April happens twice: the first, summer-time one (15:30 UTC).
        assert_eq!(
            sydney.to_utc(date(2026, 4, 5), 150),
            Some(utc(2026, 4, 4, 15, 30))
        );
        // 02:30 on 4 October does not exist: 03:30 AEDT (16:30 UTC).
        assert_eq!(
            sydney.to_utc(date(2026, 10, 4), 150),
            Some(utc(2026, 10, 3, 16, 30))
        );
    }
}
