//! The checks on the guest's console, each against what a user of the agent would read.

use std::{collections::BTreeMap, fmt::Write as _, io::Write as _};

use anyhow::{Result, bail};

use super::{DELAY_MS, FILE_BYTES};
use crate::say;

/// The text between `@@begin name` and `@@end name` on the console.
pub(super) fn section<'a>(log: &'a str, name: &str) -> &'a str {
    let begin = format!("@@begin {name}\n");
    let Some(start) = log.find(&begin).map(|i| i + begin.len()) else { return "" };
    let end = log[start..].find(&format!("@@end {name}")).map_or(log.len(), |i| start + i);
    &log[start..end]
}

fn marker(log: &str, name: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(&format!("@@ {name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// `40.3ms`, `425µs`, `1.2s` in milliseconds.
fn millis(s: &str) -> Option<f64> {
    let s = s.trim_end_matches(',');
    for (unit, scale) in [("ms", 1.0), ("µs", 1e-3), ("ns", 1e-6), ("s", 1e3)] {
        if let Some(v) = s.strip_suffix(unit) {
            return v.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

/// `2.2KiB`, `184B` in bytes.
fn bytes(s: &str) -> Option<f64> {
    let s = s.trim_end_matches(',');
    for (unit, scale) in
        [("KiB", 1024.0), ("MiB", 1024.0 * 1024.0), ("GiB", 1024.0_f64.powi(3)), ("B", 1.0)]
    {
        if let Some(v) = s.strip_suffix(unit) {
            return v.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

/// The word after `key` in `line`.
fn after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()
}

/// Application exchanges, one kind per server, each seen at both ends: the client's end waits
/// for the request's injected [`DELAY_MS`] in netem, so its latency is at least that, and most
/// of it more than the server's. Not all of it: the server's end lasts until its last write
/// returns, and writing a large response (`/file`, while the client's delayed ACKs arrive) can
/// outlast the first bytes' arrival at the client by a few ms under qemu's emulation.
fn check_exchanges(out: &str, fail: &mut impl FnMut(String)) {
    let kinds = [
        ("HTTP", "10.0.0.2:8080", "http-response", "/file → 200", 3),
        ("HTTPS through nginx (TLS uprobes)", "10.0.0.2:8443", "http-response", "/file → 200", 2),
        ("Redis", "10.0.0.2:6379", "redis-response", "Redis SET", 1),
        ("Redis", "10.0.0.2:6379", "redis-response", "Redis GET", 1),
        ("PostgreSQL", "10.0.0.2:5432", "postgres-response", "PostgreSQL SELECT", 1),
        ("DNS", "10.0.0.2:53", "dns-response", "10.0.0.7", 1),
    ];
    for (what, server, kind, summary, count) in kinds {
        // Per client port: (latency at the client, at the server). The second end to report
        // names the first's time (`(server 6.1ms)` at the client, `(client 46.3ms)` at the
        // server); where the ends are not paired (DNS over an unconnected socket), each end is
        // the one whose process the line names.
        let mut ends: BTreeMap<&str, (Option<f64>, Option<f64>)> = BTreeMap::new();
        for l in out.lines().filter(|l| {
            l.contains(&format!("-> {server} ")) && l.contains(kind) && l.contains(summary)
        }) {
            let Some(port) = l.split_whitespace().find(|w| w.starts_with("10.0.0.1:")) else {
                continue;
            };
            let Some(own) = after(l, "in").and_then(millis) else { continue };
            let peer = |key: &str| after(l, key).and_then(|v| millis(v.trim_end_matches(')')));
            let e = ends.entry(port).or_default();
            if let Some(at_server) = peer("(server") {
                *e = (Some(own), Some(at_server));
            } else if let Some(at_client) = peer("(client") {
                *e = (Some(at_client), Some(own));
            } else if l.contains(&format!("-> {server} (")) {
                e.1.get_or_insert(own);
            } else {
                e.0.get_or_insert(own);
            }
        }
        let both: Vec<(f64, f64)> =
            ends.values().filter_map(|(c, s)| Some(((*c)?, (*s)?))).collect();
        if both.len() < count {
            fail(format!(
                "{what}: {count} `{summary}` exchanges made, {} reported at both ends: {ends:?}",
                both.len()
            ));
        }
        for (at_client, at_server) in &both {
            if !(DELAY_MS - 1.0..=DELAY_MS * 4.0).contains(at_client)
                || at_client - at_server < DELAY_MS * 0.75
            {
                fail(format!(
                    "{what}: `{summary}` took {at_client:.1} ms at the client and {at_server:.1} \
                     ms at the server; the request was delayed {DELAY_MS} ms between them"
                ));
            }
        }
        say(&format!("{what} `{summary}`: (client, server) ms {both:.1?}"));
    }
}

/// The checks, each against what a user of the agent would read.
pub(super) fn verify(log: &str) -> Result<()> {
    let mut failures = Vec::new();
    let mut fail = |msg: String| failures.push(msg);
    // The serial console ends lines with CR LF.
    let log = &log.replace("\r\n", "\n");
    if !log.contains("@@ done") {
        bail!("the guest did not reach the end of its script");
    }
    let err = section(log, "agent.err");
    let out = section(log, "agent.out");
    let metrics = section(log, "metrics");
    for line in log.lines().filter(|l| l.starts_with("@@ ") && l.contains("fail")) {
        fail(format!("guest: {line}"));
    }
    say(&format!(
        "guest {}, agent started in {} s",
        log.lines().find_map(|l| l.strip_prefix("@@ kernel ")).unwrap_or("?"),
        marker(log, "agent_start_seconds").map_or("?".to_owned(), |s| s.to_string())
    ));

    // Start-up: running, L7 capture on the syscall path, address translation unavailable.
    for (what, needle) in [
        (
            "the agent captures L7 through syscall tracepoints (no sock:sock_send_length on 6.1)",
            "hopwatch agent: l7_capture: on, via tracepoint/syscalls/sys_{enter,exit}_",
        ),
        (
            "the agent reports address translation unavailable",
            "hopwatch agent: address_translation: unavailable",
        ),
        (
            "the agent attaches the drop hook with reasons",
            "hopwatch agent: drops: on, via tp_btf/kfree_skb with the kernel's drop reasons",
        ),
        (
            "the agent attaches its TCP hooks",
            "hopwatch agent: tcp: on, via tp_btf/inet_sock_set_state",
        ),
        ("the agent attaches its TLS uprobes", "hopwatch agent: tls: on, via uprobe/"),
    ] {
        if !err.contains(needle) {
            fail(format!("{what}: no `{needle}` on its stderr"));
        }
    }
    if !metrics.lines().any(|l| {
        l.starts_with("hopwatch_capability_up{capability=\"l7_capture\"") && l.ends_with(" 1")
    }) {
        fail("/metrics has no hopwatch_capability_up{capability=\"l7_capture\"} 1".to_owned());
    }
    check_exchanges(out, &mut fail);
    // TLS handshakes from the records on the wire: TLS 1.2 (nginx 1.22's default) takes two
    // round trips, each carrying the injected delay once, at both ends.
    let handshakes: Vec<f64> = out
        .lines()
        .filter(|l| l.contains("-> 10.0.0.2:8443 ") && l.contains("TLS 1.2 handshake"))
        .filter_map(|l| after(l, "in").and_then(millis))
        .collect();
    if handshakes.len() < 4 {
        fail(format!(
            "2 TLS connections to nginx, {} handshakes reported (of 4: both ends)",
            handshakes.len()
        ));
    }
    for ms in &handshakes {
        if *ms < 2.0 * DELAY_MS - 1.0 {
            fail(format!("a TLS 1.2 handshake took {ms:.1} ms, two round trips of {DELAY_MS} ms"));
        }
    }
    say(&format!("TLS 1.2 handshakes with nginx: {handshakes:.1?} ms"));

    // TCP: connect latency against the injected delay, bytes against the file size.
    let connects: Vec<f64> = out
        .lines()
        .filter(|l| l.contains("-> 10.0.0.2:8080 tcp-connect FORWARDED"))
        .filter_map(|l| after(l, "connect").and_then(millis))
        .collect();
    if connects.len() < 3 {
        fail(format!("3 connects to 10.0.0.2:8080 were made, {} reported", connects.len()));
    }
    for ms in &connects {
        // At least the delay of the SYN; the guest is emulated, so generous above.
        if !(DELAY_MS - 1.0..=DELAY_MS * 3.0).contains(ms) {
            fail(format!("connect latency {ms:.1} ms, injected {DELAY_MS} ms"));
        }
    }
    // Bytes: the client's close flow of each download (the one that read the file). Each
    // connection also has the server's close (both ends are on this node).
    let mut received: BTreeMap<&str, f64> = BTreeMap::new();
    let mut zero_closes = 0;
    for l in out.lines().filter(|l| l.contains("-> 10.0.0.2:8080") && l.contains("tcp-close")) {
        let Some(b) = after(l, "received").and_then(bytes) else { continue };
        let port = l.split_whitespace().find(|w| w.starts_with("10.0.0.1:")).unwrap_or("?");
        let best = received.entry(port).or_insert(0.0);
        *best = best.max(b);
        if b == 0.0 {
            zero_closes += 1;
        }
    }
    if received.len() < 3 {
        fail(format!("3 downloads were made, {} have close flows", received.len()));
    }
    #[expect(clippy::cast_precision_loss, reason = "a small size")]
    let want = FILE_BYTES as f64;
    for (port, b) in &received {
        if *b < want || *b > want * 1.05 {
            fail(format!(
                "the download from {port} of {FILE_BYTES} B (plus headers) reported {b:.0} B \
                 received"
            ));
        }
    }
    say(&format!(
        "connect latencies {connects:.1?} ms; received {:.0?} B; {zero_closes} close flows with \
         no counters",
        received.values().collect::<Vec<_>>()
    ));

    // A refused connect, a netfilter drop with its reason.
    if !out
        .lines()
        .any(|l| l.contains("-> 10.0.0.2:9 tcp-connect-failed ERROR") && l.contains("ECONNREFUSED"))
    {
        fail("no ECONNREFUSED flow for the connect to 10.0.0.2:9".to_owned());
    }
    if !out
        .lines()
        .any(|l| l.contains("-> 10.0.0.2:7777 tcp-drop DROPPED NETFILTER_DROP at nft_do_chain+0x"))
    {
        // nf_tables is loaded after the agent started: its functions are named all the same.
        fail(
            "no NETFILTER_DROP flow at nft_do_chain for the SYN to 10.0.0.2:7777 dropped by \
             nftables"
                .to_owned(),
        );
    }

    // SIGKILL leaves nothing behind.
    match (
        marker(log, "progs_before"),
        marker(log, "progs_running"),
        marker(log, "progs_after_kill"),
    ) {
        (Some(before), Some(running), Some(after)) => {
            if running <= before {
                fail(format!(
                    "bpftool saw no programs of the agent ({before} before, {running} running)"
                ));
            }
            if after != before {
                fail(format!(
                    "after SIGKILL {after} BPF programs remain ({before} before the agent)"
                ));
            }
        }
        other => fail(format!("bpftool program counts missing: {other:?}")),
    }
    if failures.is_empty() {
        say("vm-test: every check passed");
        return Ok(());
    }
    let mut msg = String::new();
    for f in &failures {
        let _ = writeln!(msg, "  - {f}");
    }
    let _ = std::io::stderr()
        .write_all(format!("agent stderr:\n{err}\nagent stdout:\n{out}\n").as_bytes());
    bail!("{} check(s) failed:\n{msg}", failures.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_as_the_printer_writes_them() {
        assert_eq!(millis("40.3ms"), Some(40.3));
        assert_eq!(millis("425µs"), Some(0.425));
        assert_eq!(bytes("2.0KiB"), Some(2048.0));
        assert_eq!(bytes("184B,"), Some(184.0));
        let l = "x -> 10.0.0.2:8080 tcp-connect FORWARDED connect 40.3ms";
        assert_eq!(after(l, "connect").and_then(millis), Some(40.3));
    }
}
