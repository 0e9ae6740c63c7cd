//! The time zone that protection-group schedules are written in: a fixed UTC offset plus an
//! optional daylight-saving rule (the EU's or the US's), so "20:00 every day" means 20:00 on
//! the administrator's wall clock all year round, without a time zone database.
//!
//! Conversions from wall time to UTC follow the usual conventions: a wall time that does not
//! exist (skipped by the spring change, e.g. 02:30 in Berlin on the last Sunday of March) runs
//! at the same distance after the change (03:30 summer time); a wall time that happens twice
//! (the autumn change) runs at its first occurrence only.
//!
//! Owns: parsing and naming zones, civil-date arithmetic. Must not read the system clock or
//! the system's time zone: the zone is configuration, time is a parameter.

use std::fmt;

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;

/// A daylight-saving rule: when summer time (one hour ahead of standard time) applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DstRule {
    /// European Union: last Sunday of March 01:00 UTC to last Sunday of October 01:00 UTC.
    Eu,
    /// United States: second Sunday of March 02:00 local to first Sunday of November 02:00
    /// local (summer time).
    Us,
}

/// A time zone for schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeZone {
    /// Standard (winter) offset from UTC, in minutes east.
    pub std_offset_minutes: i32,
    /// Summer time, if the zone has it.
    pub dst: Option<DstRule>,
}

/// A zone name that [`TimeZone::parse`] does not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "time zone {0:?} is not understood: use UTC, a fixed offset like +02:00 or -05:30, an offset \
     with a daylight-saving rule like +01:00/eu or -05:00/us, or one of the names {names}",
    names = NAMED.iter().map(|(n, _, _)| *n).collect::<Vec<_>>().join(", ")
)]
pub struct Error(pub String);

/// Zone names accepted as shorthands.
const NAMED: &[(&str, i32, Option<DstRule>)] = &[
    ("UTC", 0, None),
    ("Europe/London", 0, Some(DstRule::Eu)),
    ("Europe/Lisbon", 0, Some(DstRule::Eu)),
    ("Europe/Dublin", 0, Some(DstRule::Eu)),
    ("Europe/Berlin", 60, Some(DstRule::Eu)),
    ("Europe/Paris", 60, Some(DstRule::Eu)),
    ("Europe/Amsterdam", 60, Some(DstRule::Eu)),
    ("Europe/Madrid", 60, Some(DstRule::Eu)),
    ("Europe/Rome", 60, Some(DstRule::Eu)),
    ("Europe/Vienna", 60, Some(DstRule::Eu)),
    ("Europe/Zurich", 60, Some(DstRule::Eu)),
    ("Europe/Stockholm", 60, Some(DstRule::Eu)),
    ("Europe/Warsaw", 60, Some(DstRule::Eu)),
    ("Europe/Helsinki", 120, Some(DstRule::Eu)),
    ("Europe/Athens", 120, Some(DstRule::Eu)),
    ("America/New_York", -300, Some(DstRule::Us)),
    ("America/Chicago", -360, Some(DstRule::Us)),
    ("America/Denver", -420, Some(DstRule::Us)),
    ("America/Phoenix", -420, None),
    ("America/Los_Angeles", -480, Some(DstRule::Us)),
    ("Asia/Tokyo", 540, None),
    ("Asia/Kolkata", 330, None),
    ("Asia/Singapore", 480, None),
    ("Australia/Brisbane", 600, None),
];

impl Default for TimeZone {
    fn default() -> Self {
        TimeZone::UTC
    }
}

impl TimeZone {
    /// Coordinated Universal Time.
    pub const UTC: TimeZone = TimeZone {
        std_offset_minutes: 0,
        dst: None,
    };

    /// Parses `UTC`, `+HH:MM`, `-HH:MM`, either followed by `/eu` or `/us`, or a known name.
    pub fn parse(text: &str) -> Result<TimeZone, Error> {
        let bad = || Error(text.to_owned());
        let trimmed = text.trim();
        if let Some((_, offset, dst)) = NAMED
            .iter()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(trimmed))
        {
            return Ok(TimeZone {
                std_offset_minutes: *offset,
                dst: *dst,
            });
        }
        let (offset, rule) = match trimmed.split_once('/') {
            Some((offset, rule)) => (offset, Some(rule)),
            None => (trimmed, None),
        };
        let dst = match rule.map(str::to_ascii_lowercase).as_deref() {
            None => None,
            Some("eu") => Some(DstRule::Eu),
            Some("us") => Some(DstRule::Us),
            Some(_) => return Err(bad()),
        };
        let (sign, rest) = match offset.as_bytes().first() {
            Some(b'+') => (1, &offset[1..]),
            Some(b'-') => (-1, &offset[1..]),
            _ if offset.eq_ignore_ascii_case("utc") || offset == "Z" => (1, "00:00"),
            _ => return Err(bad()),
        };
        let (hours, minutes) = rest.split_once(':').ok_or_else(bad)?;
        let all_digits = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(hours) || !all_digits(minutes) {
            return Err(bad());
        }
        let (hours, minutes): (i32, i32) = (
            hours.parse().map_err(|_| bad())?,
            minutes.parse().map_err(|_| bad())?,
        );
        if hours > 14 || minutes >= 60 {
            return Err(bad());
        }
        Ok(TimeZone {
            std_offset_minutes: sign * (hours * 60 + minutes),
            dst,
        })
    }

    /// The offset from UTC in force at `utc_ms`, in minutes.
    pub fn offset_at(&self, utc_ms: i64) -> i32 {
        match self.dst {
            None => self.std_offset_minutes,
            Some(rule) => {
                let (year, _, _) = civil_from_days(utc_ms.div_euclid(DAY_MS));
                let (start, end) = self.dst_bounds(rule, year);
                if (start..end).contains(&utc_ms) {
                    self.std_offset_minutes + 60
                } else {
                    self.std_offset_minutes
                }
            }
        }
    }

    /// Summer time of `year` as a UTC interval `[start, end)`.
    fn dst_bounds(&self, rule: DstRule, year: i64) -> (i64, i64) {
        let std = i64::from(self.std_offset_minutes) * MINUTE_MS;
        match rule {
            DstRule::Eu => (
                last_sunday(year, 3) * DAY_MS + 60 * MINUTE_MS,
                last_sunday(year, 10) * DAY_MS + 60 * MINUTE_MS,
            ),
            DstRule::Us => (
                nth_sunday(year, 3, 2) * DAY_MS + 120 * MINUTE_MS - std,
                nth_sunday(year, 11, 1) * DAY_MS + 60 * MINUTE_MS - std,
            ),
        }
    }

    /// The wall-clock date (days since 1970-01-01) and minute of day at `utc_ms`.
    pub fn local(&self, utc_ms: i64) -> (i64, u16) {
        let local = utc_ms + i64::from(self.offset_at(utc_ms)) * MINUTE_MS;
        (
            local.div_euclid(DAY_MS),
            (local.rem_euclid(DAY_MS) / MINUTE_MS) as u16,
        )
    }

    /// The UTC instant of wall time `minute_of_day` on local date `day` (days since
    /// 1970-01-01). Skipped wall times move forward by the change; repeated ones take the
    /// first occurrence.
    pub fn to_utc(&self, day: i64, minute_of_day: u16) -> i64 {
        let wall = day * DAY_MS + i64::from(minute_of_day) * MINUTE_MS;
        let std = i64::from(self.std_offset_minutes) * MINUTE_MS;
        if self.dst.is_none() {
            return wall - std;
        }
        let summer = wall - std - 60 * MINUTE_MS;
        let winter = wall - std;
        let summer_ok = self.offset_at(summer) == self.std_offset_minutes + 60;
        let winter_ok = self.offset_at(winter) == self.std_offset_minutes;
        match (summer_ok, winter_ok) {
            // Repeated hour: both readings exist; the summer one is earlier.
            (true, true) | (true, false) => summer,
            (false, true) => winter,
            // Skipped hour: read it with the standard offset, i.e. one hour later on the
            // summer-time clock.
            (false, false) => winter,
        }
    }
}

impl fmt::Display for TimeZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((name, _, _)) = NAMED
            .iter()
            .find(|(_, o, d)| *o == self.std_offset_minutes && *d == self.dst)
        {
            return f.write_str(name);
        }
        let sign = if self.std_offset_minutes < 0 {
            '-'
        } else {
            '+'
        };
        let abs = self.std_offset_minutes.abs();
        write!(f, "{sign}{:02}:{:02}", abs / 60, abs % 60)?;
        match self.dst {
            None => Ok(()),
            Some(DstRule::Eu) => f.write_str("/eu"),
            Some(DstRule::Us) => f.write_str("/us"),
        }
    }
}

/// Day of the week of a day number: 0 = Monday ... 6 = Sunday (1970-01-01 was a Thursday).
pub fn weekday(day: i64) -> u8 {
    (day + 3).rem_euclid(7) as u8
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let shifted_month = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * shifted_month + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `YYYY-MM-DDTHH:MMZ` of a Unix time in milliseconds (UTC), for messages.
pub fn rfc3339_utc(unix_ms: u64) -> String {
    let secs = (unix_ms / 1000) as i64;
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let minute = secs.rem_euclid(86_400) / 60;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}Z",
        minute / 60,
        minute % 60
    )
}

/// The date `(year, month, day)` of a day number.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn last_sunday(year: i64, month: u32) -> i64 {
    let (next_year, next_month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    let last = days_from_civil(next_year, next_month, 1) - 1;
    last - i64::from((weekday(last) + 1) % 7)
}

fn nth_sunday(year: i64, month: u32, n: i64) -> i64 {
    let first = days_from_civil(year, month, 1);
    first + i64::from((6 + 7 - weekday(first)) % 7) + 7 * (n - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(y: i64, mo: u32, d: u32, h: i64, mi: i64) -> i64 {
        days_from_civil(y, mo, d) * DAY_MS + h * 3_600_000 + mi * MINUTE_MS
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
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(weekday(0), 3, "1970-01-01 was a Thursday");
        assert_eq!(weekday(days_from_civil(2026, 11, 28)), 5, "a Saturday");
        for day in [-800_000, -1, 0, 59, 365, 11_016, 20_454, 2_000_000] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn parse_and_display() {
        let cases = [
            ("UTC", 0, None, "UTC"),
            ("+02:00", 120, None, "+02:00"),
            ("-05:30", -330, None, "-05:30"),
            ("+01:00/eu", 60, Some(DstRule::Eu), "Europe/Berlin"),
            ("europe/berlin", 60, Some(DstRule::Eu), "Europe/Berlin"),
            ("-05:00/US", -300, Some(DstRule::Us), "America/New_York"),
            ("+03:00/eu", 180, Some(DstRule::Eu), "+03:00/eu"),
        ];
        for (text, offset, dst, shown) in cases {
            let zone = TimeZone::parse(text).unwrap();
            assert_eq!((zone.std_offset_minutes, zone.dst), (offset, dst), "{text}");
            assert_eq!(zone.to_string(), shown);
        }
        for bad in [
            "",
            "CET",
            "+2",
            "+02:60",
            "+15:00",
            "+01:00/xx",
            "Mars/Olympus",
        ] {
            let err = TimeZone::parse(bad).unwrap_err();
            assert!(err.to_string().contains("Europe/Berlin"), "{err}");
        }
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
        let spring = days_from_civil(2026, 3, 29);
        let autumn = days_from_civil(2026, 10, 25);
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
                expected,
                "day {day} minute {minute}"
            );
        }
        assert_eq!(
            berlin.local(utc(2026, 7, 1, 18, 0)),
            (days_from_civil(2026, 7, 1), 20 * 60)
        );
    }
}
