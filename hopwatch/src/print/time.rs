//! `--time-format` layouts of `hubble observe` (always in UTC), for every printer.

use hopwatch_proto::clock::civil_from_days;

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

#[expect(clippy::many_single_char_names, reason = "calendar fields: y, mo, d, h, s")]
pub(crate) fn format(ts: &prost_types::Timestamp, f: TimeFormat) -> String {
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
}
