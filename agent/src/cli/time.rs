//! Times for `observe`: `--since`/`--until` values (relative like `5m`, or RFC 3339) and the
//! `--time-format` layouts of `hubble observe` (always in UTC).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Layouts of `--time-format`, named as in `hubble observe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TimeFormat {
    /// `Jan  2 15:04:05.000`
    #[value(name = "StampMilli")]
    StampMilli,
    /// `2006-01-02T15:04:05Z`
    #[value(name = "RFC3339")]
    Rfc3339,
    /// `2006-01-02T15:04:05.000Z`
    #[value(name = "RFC3339Milli")]
    Rfc3339Milli,
    /// `2006-01-02T15:04:05.000000Z`
    #[value(name = "RFC3339Micro")]
    Rfc3339Micro,
    /// `2006-01-02T15:04:05.999999999Z` (trailing zeros trimmed)
    #[value(name = "RFC3339Nano")]
    Rfc3339Nano,
    /// `Mon, 02 Jan 2006 15:04:05 +0000`
    #[value(name = "RFC1123Z")]
    Rfc1123Z,
}

const MONTHS: [&str; 12] =
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).expect("1..=31");
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).expect("1..=12");
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[expect(clippy::many_single_char_names, reason = "calendar fields: y, mo, d, h, s")]
pub fn format(ts: &prost_types::Timestamp, f: TimeFormat) -> String {
    let (secs, nanos) = (ts.seconds, ts.nanos.clamp(0, 999_999_999));
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (sod / 3600, sod / 60 % 60, sod % 60);
    let month = MONTHS[usize::try_from(mo - 1).expect("month index")];
    let date = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
    match f {
        TimeFormat::StampMilli => {
            format!("{month} {d:>2} {h:02}:{mi:02}:{s:02}.{:03}", nanos / 1_000_000)
        }
        TimeFormat::Rfc3339 => format!("{date}Z"),
        TimeFormat::Rfc3339Milli => format!("{date}.{:03}Z", nanos / 1_000_000),
        TimeFormat::Rfc3339Micro => format!("{date}.{:06}Z", nanos / 1_000),
        TimeFormat::Rfc3339Nano => {
            let frac = format!("{nanos:09}");
            let frac = frac.trim_end_matches('0');
            if frac.is_empty() { format!("{date}Z") } else { format!("{date}.{frac}Z") }
        }
        TimeFormat::Rfc1123Z => {
            let dow = DAYS[usize::try_from(days.rem_euclid(7)).expect("0..7")];
            format!("{dow}, {d:02} {month} {y:04} {h:02}:{mi:02}:{s:02} +0000")
        }
    }
}

/// `--since`/`--until`: a duration ago (`5m`, `1h30m`, `2d`) or an absolute time (RFC 3339 with
/// `Z` or an offset, optional fraction; or a date `2024-05-01`).
pub fn parse_when(s: &str) -> Result<prost_types::Timestamp, String> {
    let s = s.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        let at = SystemTime::now().checked_sub(d).unwrap_or(UNIX_EPOCH);
        return Ok(prost_types::Timestamp::from(at));
    }
    parse_rfc3339(s).ok_or_else(|| {
        format!("{s:?} is neither a duration ago (5m, 1h30m) nor an RFC 3339 time (2024-05-01T10:00:00Z)")
    })
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
pub fn parse_latency(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 50ms: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos }
    }

    #[test]
    fn formats_like_hubble() {
        // 2026-11-03 06:01:02.123456789 UTC, a Tuesday.
        let t = ts(1_793_685_662, 123_456_789);
        assert_eq!(format(&t, TimeFormat::StampMilli), "Nov  3 06:01:02.123");
        assert_eq!(format(&t, TimeFormat::Rfc3339), "2026-11-03T06:01:02Z");
        assert_eq!(format(&t, TimeFormat::Rfc3339Milli), "2026-11-03T06:01:02.123Z");
        assert_eq!(format(&t, TimeFormat::Rfc3339Micro), "2026-11-03T06:01:02.123456Z");
        assert_eq!(format(&t, TimeFormat::Rfc3339Nano), "2026-11-03T06:01:02.123456789Z");
        assert_eq!(format(&ts(1_793_685_662, 0), TimeFormat::Rfc3339Nano), "2026-11-03T06:01:02Z");
        assert_eq!(format(&t, TimeFormat::Rfc1123Z), "Tue, 03 Nov 2026 06:01:02 +0000");
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
            assert!(parse_when(bad).is_err(), "{bad}");
        }
    }
}
