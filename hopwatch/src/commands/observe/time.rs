//! Times for `observe`: `--since`/`--until` values (relative like `5m`, or RFC 3339) and
//! `--min-latency`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hopwatch_proto::clock::days_from_civil;

/// A time or duration flag value that does not parse (clap names the flag: exit status 2).
#[derive(Debug, thiserror::Error)]
pub(crate) enum TimeError {
    /// `--since`/`--until`.
    #[error(
        "{value:?} is neither a duration ago (5m, 1h30m) nor an RFC 3339 time \
         (2024-05-01T10:00:00Z)"
    )]
    When { value: String },
    /// `--min-latency`.
    #[error("{value:?} is not a duration like 50ms: {source}")]
    Latency {
        value: String,
        #[source]
        source: humantime::DurationError,
    },
}

/// `--since`/`--until`: a duration ago (`5m`, `1h30m`, `2d`) or an absolute time (RFC 3339 with
/// `Z` or an offset, optional fraction; or a date `2024-05-01`).
pub(crate) fn parse_when(s: &str) -> Result<prost_types::Timestamp, TimeError> {
    let s = s.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        let at = SystemTime::now().checked_sub(d).unwrap_or(UNIX_EPOCH);
        return Ok(prost_types::Timestamp::from(at));
    }
    parse_rfc3339(s).ok_or_else(|| TimeError::When { value: s.to_owned() })
}

fn num<T: std::str::FromStr>(s: &str, range: std::ops::RangeInclusive<usize>) -> Option<T> {
    let part = s.get(range)?;
    if !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    part.parse().ok()
}

#[expect(clippy::many_single_char_names, reason = "calendar fields: y, mo, d, h, s")]
fn parse_rfc3339(s: &str) -> Option<prost_types::Timestamp> {
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d): (i64, u32, u32) = (num(s, 0..=3)?, num(s, 5..=6)?, num(s, 8..=9)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let mut seconds = days_from_civil(y, mo, d) * 86_400;
    let mut nanos = 0i32;
    if b.len() > 10 {
        if !matches!(b[10], b'T' | b't' | b' ') || b.len() < 19 || b[13] != b':' || b[16] != b':' {
            return None;
        }
        let (h, mi, sec): (i64, i64, i64) = (num(s, 11..=12)?, num(s, 14..=15)?, num(s, 17..=18)?);
        if h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        seconds += h * 3600 + mi * 60 + sec;
        let mut rest = &s[19..];
        if let Some(frac) = rest.strip_prefix('.') {
            let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || digits > 9 {
                return None;
            }
            nanos = format!("{:0<9}", &frac[..digits]).parse().ok()?;
            rest = &frac[digits..];
        }
        match rest {
            "Z" | "z" => {}
            off if off.len() == 6
                && (off.starts_with('+') || off.starts_with('-'))
                && &off[3..4] == ":" =>
            {
                let (oh, om): (i64, i64) = (num(off, 1..=2)?, num(off, 4..=5)?);
                let offset = (oh * 3600 + om * 60) * if off.starts_with('-') { -1 } else { 1 };
                seconds -= offset;
            }
            _ => return None,
        }
    }
    Some(prost_types::Timestamp { seconds, nanos })
}

/// `--min-latency`: `50ms`, `1.5s`, `200us`.
pub(crate) fn parse_latency(s: &str) -> Result<Duration, TimeError> {
    humantime::parse_duration(s.trim())
        .map_err(|source| TimeError::Latency { value: s.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos }
    }

    #[test]
    fn parses_absolute_and_relative_times() {
        assert_eq!(parse_when("2026-11-03T06:01:02Z").unwrap(), ts(1_793_685_662, 0));
        assert_eq!(
            parse_when("2026-11-03T08:01:02.5+02:00").unwrap(),
            ts(1_793_685_662, 500_000_000)
        );
        assert_eq!(parse_when("1970-01-02").unwrap(), ts(86_400, 0));
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let five_min_ago = parse_when("5m").unwrap();
        let diff = i64::try_from(now).unwrap() - five_min_ago.seconds;
        assert!((299..=301).contains(&diff), "{diff}");
        assert!(parse_when("1h30m").is_ok());
        for bad in
            ["yesterday", "2026-13-01", "2026-11-03T25:00:00Z", "2026-11-03T06:01:02", "5 parsecs"]
        {
            let err = parse_when(bad).expect_err(bad);
            assert!(matches!(&err, TimeError::When { value } if value == bad), "{err:?}");
            assert!(err.to_string().contains("RFC 3339"), "{err}");
        }
    }

    #[test]
    fn parses_latencies() {
        assert_eq!(parse_latency(" 50ms").unwrap(), Duration::from_millis(50));
        let err = parse_latency("fast").unwrap_err();
        assert!(matches!(&err, TimeError::Latency { value, .. } if value == "fast"), "{err:?}");
        assert!(err.to_string().starts_with("\"fast\" is not a duration like 50ms: "), "{err}");
    }
}
