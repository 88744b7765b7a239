//! Text output of `hopwatch hops`: aligned columns for hops, indented trees for paths, or one
//! JSON document.

use std::fmt::Write as _;

use hopwatch_hops::{
    links::LinkCounts,
    path::{Path, PathStep, Via},
    view::{HopRow, Latency},
};

use super::{HopsFormat, Summary};
use crate::print::human_ns;

/// Writes a summary as a table or one JSON line.
pub(crate) fn write_summary(
    out: &mut impl std::io::Write,
    s: &Summary,
    format: HopsFormat,
    title: Option<&str>,
) -> std::io::Result<()> {
    match format {
        HopsFormat::Json => {
            serde_json::to_writer(&mut *out, s)?;
            writeln!(out)
        }
        HopsFormat::Table => {
            if let Some(t) = title {
                writeln!(out, "{t}")?;
            }
            match (&s.hops, &s.paths) {
                (Some(rows), _) => write!(out, "{}", table(rows)),
                (_, Some(paths)) => {
                    write!(out, "{}", path_table(paths))?;
                    if let Some(l) = &s.links {
                        write!(out, "{}", links_line(l))?;
                    }
                    Ok(())
                }
                _ => Ok(()),
            }
        }
    }
}

fn lat(l: Option<&Latency>, f: fn(&Latency) -> u64) -> String {
    l.map_or_else(|| "-".to_owned(), |l| human_ns(f(l)))
}

fn hop_name(r: &HopRow) -> String {
    format!("{} → {}:{}", r.source.display(), r.destination.display(), r.port)
}

fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |x| format!("{:.1}%", x * 100.0))
}

/// Columns padded to their widest cell.
fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            // Names left-aligned, numbers right-aligned.
            if i < 2 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
            s.push_str("  ");
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// The hop table.
#[must_use]
pub(crate) fn table(rows: &[HopRow]) -> String {
    let header = [
        "HOP",
        "PROTO",
        "REQ/S",
        "ERR%",
        "P50",
        "P90",
        "P99",
        "SRV P99",
        "CONN P99",
        "TLS P99",
        "SETUP P99",
        "CONNS",
        "RETRANS",
        "DROPS",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let client = r.client_latency.as_ref().or(r.server_latency.as_ref());
            vec![
                hop_name(r),
                r.protocol.clone(),
                format!("{:.2}", r.requests_per_second),
                pct(r.error_ratio),
                lat(client, |l| l.p50_ns),
                lat(client, |l| l.p90_ns),
                lat(client, |l| l.p99_ns),
                lat(r.server_latency.as_ref(), |l| l.p99_ns),
                lat(r.connect_latency.as_ref(), |l| l.p99_ns),
                lat(r.client_tls_handshake.as_ref().or(r.server_tls_handshake.as_ref()), |l| {
                    l.p99_ns
                }),
                lat(r.connection_setup.as_ref().map(|s| &s.total), |l| l.p99_ns),
                r.connects.to_string(),
                r.retransmits.to_string(),
                r.drops_total.to_string(),
            ]
        })
        .collect();
    if cells.is_empty() {
        return "no hops in this window\n".to_owned();
    }
    columns(&header, &cells)
}

/// How a step joins the hop above: `link:thread`, `endpoint`, or nothing for the entry.
fn via(s: &PathStep) -> String {
    match s.via {
        Via::Entry => String::new(),
        Via::Endpoint => "endpoint".to_owned(),
        Via::Link => {
            let methods: Vec<&str> = s.links.keys().map(String::as_str).collect();
            format!("link:{}", methods.join(","))
        }
    }
}

/// What the tracer's links covered, under the paths.
fn links_line(l: &LinkCounts) -> String {
    if l.spans == 0 {
        return "links: none in this window (paths chain through named programs only)\n".to_owned();
    }
    let mut s = format!("links: {} of {} exchanges linked to their caller", l.linked, l.spans);
    if l.parent_not_seen > 0 {
        let _ = write!(s, ", {} to a caller outside the window", l.parent_not_seen);
    }
    if l.not_kept > 0 {
        let _ = write!(s, ", {} not kept (memory bound or malformed)", l.not_kept);
    }
    s.push('\n');
    s
}

/// Paths, each as an indented tree of hops with shares.
#[must_use]
pub(crate) fn path_table(paths: &[Path]) -> String {
    if paths.is_empty() {
        return "no paths in this window\n".to_owned();
    }
    let mut out = String::new();
    for p in paths {
        let e2e = p.end_to_end.as_ref();
        let _ = writeln!(
            out,
            "PATH {}  end-to-end p50 {} p99 {}",
            p.entry,
            lat(e2e, |l| l.p50_ns),
            lat(e2e, |l| l.p99_ns)
        );
        let cells: Vec<Vec<String>> = p
            .steps
            .iter()
            .map(|s| {
                let l = s.hop.client_latency.as_ref().or(s.hop.server_latency.as_ref());
                vec![
                    format!("{}{}", "  ".repeat(s.depth + 1), hop_name(&s.hop)),
                    via(s),
                    s.hop.protocol.clone(),
                    format!("{:.2}", s.hop.requests_per_second),
                    lat(l, |l| l.p50_ns),
                    lat(l, |l| l.p99_ns),
                    pct(s.share),
                    pct(s.self_share),
                    s.calls_per_request.map_or_else(|| "-".to_owned(), |c| format!("{c:.2}")),
                ]
            })
            .collect();
        out.push_str(&columns(
            &["HOP", "VIA", "PROTO", "REQ/S", "P50", "P99", "SHARE", "SELF", "CALLS/REQ"],
            &cells,
        ));
        out.push('\n');
    }
    out
}
