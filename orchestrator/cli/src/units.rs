//! Byte sizes and durations as people write and read them: `64KiB`, `1.5 GiB`, `64KB`;
//! `90s`, `1h30m`, `2d`. Parsing is bytesize's and humantime's; this module only keeps the
//! forms cairn accepted before them (a bare number, a bare `k`/`M`/`G`/`T`) meaning what they
//! meant.

use std::time::Duration;

use bytesize::ByteSize;

/// A size or duration that does not parse; the message names the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{text:?} is not a size (e.g. 64KiB, 1.5GiB, 500MB, 65536)")]
    NotASize { text: String },
    #[error("{text:?} is too large")]
    TooLarge { text: String },
    #[error("{text:?} is not a duration (e.g. 90s, 30m, 1h30m, 2d)")]
    NotADuration { text: String },
    #[error("{text:?} is not a whole number of {unit}")]
    NotWhole { text: String, unit: &'static str },
}

/// Parses `65536`, `64KiB`, `1.5GiB` (binary units, 1 KiB = 1024 bytes), `64KB`, `500MB`
/// (decimal units, 1 KB = 1000 bytes), and the bare `64k`, `4M`, `1G`, `1T`, which have
/// always meant binary units here (64k = 65536).
pub fn parse_size(text: &str) -> Result<u64, Error> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(Error::NotASize {
            text: text.to_owned(),
        });
    }
    let unit = unit.trim();
    let unit = match unit.to_ascii_lowercase().as_str() {
        "k" => "KiB",
        "m" => "MiB",
        "g" => "GiB",
        "t" => "TiB",
        _ => unit,
    };
    let size: ByteSize = format!("{number}{unit}")
        .parse()
        .map_err(|_| Error::NotASize {
            text: text.to_owned(),
        })?;
    // bytesize saturates where it overflows.
    if size.as_u64() == u64::MAX {
        return Err(Error::TooLarge {
            text: text.to_owned(),
        });
    }
    Ok(size.as_u64())
}

/// Formats bytes with a binary unit: `812.3 MiB`.
pub fn human(bytes: u64) -> String {
    ByteSize(bytes).display().iec().to_string()
}

/// Parses a duration: `90s`, `30m`, `6h`, `2d`, `1h30m`, `2w` (humantime's forms); a bare
/// number counts `bare_unit` each.
pub fn parse_duration_or(text: &str, bare_unit: Duration) -> Result<Duration, Error> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        let n: u32 = trimmed.parse().map_err(|_| Error::TooLarge {
            text: text.to_owned(),
        })?;
        return bare_unit.checked_mul(n).ok_or_else(|| Error::TooLarge {
            text: text.to_owned(),
        });
    }
    humantime::parse_duration(trimmed).map_err(|err| match err {
        humantime::DurationError::NumberOverflow => Error::TooLarge {
            text: text.to_owned(),
        },
        _ => Error::NotADuration {
            text: text.to_owned(),
        },
    })
}

/// [`parse_duration_or`] with bare numbers in seconds (`90` = 90 s).
pub fn parse_duration(text: &str) -> Result<Duration, Error> {
    parse_duration_or(text, Duration::from_secs(1))
}

/// A duration as a whole number of `unit` (e.g. days); a bare number counts units.
pub fn parse_whole(text: &str, unit: Duration, unit_name: &'static str) -> Result<u64, Error> {
    let duration = parse_duration_or(text, unit)?;
    if duration.as_nanos() % unit.as_nanos() != 0 {
        return Err(Error::NotWhole {
            text: text.to_owned(),
            unit: unit_name,
        });
    }
    u64::try_from(duration.as_nanos() / unit.as_nanos()).map_err(|_| Error::TooLarge {
        text: text.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let cases = [
            ("65536", 65536),
            ("64KiB", 65536),
            ("64k", 65536),
            ("64K", 65536),
            ("4M", 4 << 20),
            ("1 MiB", 1 << 20),
            ("1TiB", 1 << 40),
            ("1.5GiB", 3 << 29),
            ("1.5 GiB", 3 << 29),
            ("0.5k", 512),
            // Decimal units where the unit says so.
            ("64KB", 64_000),
            ("64kb", 64_000),
            ("500MB", 500_000_000),
            ("1.5GB", 1_500_000_000),
            ("2 TB", 2_000_000_000_000),
            ("7B", 7),
            (" 64KiB ", 65536),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in ["64 parsecs", "KiB", "", "1..5GiB", ".5GiB", "-1KiB", "1.5"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(Error::NotASize { .. } | Error::TooLarge { .. })
        ));
        assert!(matches!(
            parse_size("99999999999EiB"),
            Err(Error::TooLarge { .. })
        ));
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 30), "3.0 GiB");
        assert_eq!(human(1_572_864), "1.5 MiB");
    }

    #[test]
    fn durations() {
        let secs = Duration::from_secs;
        let cases = [
            ("90", secs(90)),
            ("90s", secs(90)),
            ("30m", secs(1800)),
            ("6h", secs(6 * 3600)),
            ("2d", secs(2 * 86_400)),
            ("1h30m", secs(5400)),
            ("1h 30m", secs(5400)),
            ("2w", secs(14 * 86_400)),
            ("1500ms", Duration::from_millis(1500)),
        ];
        for (text, duration) in cases {
            assert_eq!(parse_duration(text), Ok(duration), "{text}");
        }
        for bad in ["", "m", "5 parsecs", "-5s", "1.5.h"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(parse_duration("99999999999999999999d").is_err());
        let day = Duration::from_secs(86_400);
        assert_eq!(parse_whole("30", day, "days"), Ok(30));
        assert_eq!(parse_whole("30d", day, "days"), Ok(30));
        assert_eq!(parse_whole("2w", day, "days"), Ok(14));
        assert_eq!(parse_whole("48h", day, "days"), Ok(2));
        assert_eq!(
            parse_whole("36h", day, "days"),
            Err(Error::NotWhole {
                text: "36h".into(),
                unit: "days"
            })
        );
    }
}
