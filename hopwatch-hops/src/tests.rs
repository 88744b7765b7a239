//! Aggregation math on synthetic flows.

use std::time::Duration;

use hopwatch_proto::flow::{self as pb, Flow, FlowType, SocketEvent, TcpStats, layer7::Record};

use super::{
    histogram::EXPORT_BOUNDS_S,
    path::{Via, paths},
    stats::OTHER,
    testing::*,
    view::{self, HopRow, RowFilter, SortKey},
    window::Window,
    *,
};

fn agg() -> Aggregator {
    Aggregator::new(HopConfig::default())
}

fn only_row(a: &Aggregator) -> HopRow {
    let rows = view::rows(a.table(), Some(&a.context().ledger), 10.0);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    rows.into_iter().next().unwrap()
}

#[test]
fn requests_errors_and_latency_buckets() {
    let mut a = agg();
    for i in 0..90 {
        a.observe(&l7(APP, DB, T0 + i * MS, 10 * MS, false, ""), T0);
    }
    for i in 0..10 {
        a.observe(&l7(APP, DB, T0 + i * MS, 100 * MS, false, "SQLSTATE 57014"), T0);
    }
    let r = only_row(&a);
    assert_eq!(
        (r.source.name.as_str(), r.destination.name.as_str(), r.port),
        ("app", "postgres", 5432)
    );
    assert_eq!((r.requests, r.errors, r.protocol.as_str()), (100, 10, "http"));
    assert!((r.error_ratio.unwrap() - 0.1).abs() < 1e-9);
    assert!((r.requests_per_second - 10.0).abs() < 1e-9, "100 requests over 10 s");
    let lat = r.client_latency.unwrap();
    assert_eq!((lat.p50_ns, lat.count, lat.max_ns), (10 * MS, 100, 100 * MS));
    // Rank 99 of 100 falls 9/10 into the (90 ms, 100 ms] bucket holding the slow tenth.
    assert_eq!(lat.p99_ns, 99 * MS);
    assert!(r.server_latency.is_none());
    // Exported cumulative buckets: 90 at or below 10 ms, all 100 at or below 100 ms.
    let (_, hop) = a.table().iter().next().unwrap();
    let c = hop.client.as_ref().unwrap().latency.export_cumulative();
    let at = |le: f64| c[EXPORT_BOUNDS_S.iter().position(|b| (*b - le).abs() < 1e-12).unwrap()];
    assert_eq!((at(0.005), at(0.01), at(0.05), at(0.1)), (0, 90, 90, 100));
}

#[test]
fn exchanges_measured_in_the_kernel_count_on_the_hop_of_their_socket() {
    let mut a = agg();
    // Counted before the socket's first exchange flow (held back) names the hop: they wait.
    a.observe_exchange(7, Some(10 * MS), false, T0);
    let mut first = l7(APP, DB, T0, 10 * MS, false, "");
    first.socket_cookie = 7;
    a.observe(&first, T0);
    for _ in 0..96 {
        assert_eq!(a.observe_exchange(7, Some(10 * MS), false, T0 + MS), Outcome::Counted);
    }
    a.observe_exchange(7, Some(100 * MS), true, T0 + MS);
    a.observe_exchange(7, None, true, T0 + MS);
    a.observe_exchange(8, Some(MS), false, T0);
    let r = only_row(&a);
    assert_eq!((r.requests, r.errors, r.timeouts), (100, 2, 1));
    let lat = r.client_latency.unwrap();
    assert_eq!((lat.count, lat.max_ns), (99, 100 * MS), "an unanswered one has no latency");
    // Socket 8 closed before any exchange flow named its hop (the tracer may hold them): its
    // close names it.
    let totals = TcpStats { bytes_sent: 100, ..TcpStats::default() };
    a.observe(&tcp(APP, DB, T0 + 2 * MS, SocketEvent::Close, 8, totals), T0);
    assert_eq!(only_row(&a).requests, 101);
    assert_eq!(a.context().exchanges_without_hop, 0);
    // Socket 9's hop never became known: once stale, its exchange is counted apart.
    a.observe_exchange(9, Some(MS), false, T0 + 3 * MS);
    a.sweep(T0 + 3 * MS + 600 * S);
    assert_eq!(a.context().exchanges_without_hop, 1);
}

#[test]
fn both_ends_of_an_exchange_count_once_with_two_latencies() {
    let mut a = agg();
    for i in 0..20 {
        a.observe(&l7(APP, DB, T0 + i, 12 * MS, false, ""), T0);
        a.observe(&l7(APP, DB, T0 + i, 9 * MS, true, ""), T0);
    }
    let r = only_row(&a);
    assert_eq!(r.requests, 20, "client and server report the same 20 exchanges");
    assert_eq!(r.client_latency.unwrap().p50_ns, 12 * MS);
    assert_eq!(r.server_latency.unwrap().p50_ns, 9 * MS);
    assert_eq!(r.reported_by, ["client", "server"]);
}

#[test]
fn connection_totals_become_increments_and_open_connections_are_counted() {
    let mut a = agg();
    let st = |retrans, sent, recv| TcpStats {
        retransmits: retrans,
        bytes_sent: sent,
        bytes_received: recv,
        connect_latency_ns: 3 * MS,
        ..TcpStats::default()
    };
    a.observe(&tcp(APP, DB, T0, SocketEvent::Connect, 7, st(0, 0, 0)), T0);
    assert_eq!(only_row(&a).open_connections, 1);
    a.observe(&tcp(APP, DB, T0 + S, SocketEvent::Update, 7, st(2, 1000, 50)), T0);
    a.observe(&tcp(APP, DB, T0 + 2 * S, SocketEvent::Update, 7, st(3, 1500, 80)), T0);
    a.observe(&tcp(APP, DB, T0 + 3 * S, SocketEvent::Close, 7, st(3, 2000, 100)), T0);
    let r = only_row(&a);
    assert_eq!((r.connects, r.open_connections), (1, 0));
    assert_eq!((r.retransmits, r.bytes_to_server, r.bytes_to_client), (3, 2000, 100));
    assert_eq!(r.connect_latency.unwrap().p99_ns, 3 * MS);
    // A connection that predates the agent: its first report counts everything, once.
    a.observe(&tcp(APP, DB, T0 + 4 * S, SocketEvent::Update, 8, st(1, 10, 10)), T0);
    a.observe(&tcp(APP, DB, T0 + 5 * S, SocketEvent::Update, 8, st(1, 10, 10)), T0);
    let r = only_row(&a);
    assert_eq!((r.retransmits, r.bytes_to_server, r.open_connections), (4, 2010, 1));
}

#[test]
fn a_connection_whose_close_was_lost_is_no_longer_open_once_forgotten() {
    let mut a = agg();
    let st = |sent| TcpStats { bytes_sent: sent, ..TcpStats::default() };
    a.observe(&tcp(APP, DB, T0, SocketEvent::Connect, 7, st(0)), T0);
    a.observe(&tcp(APP, DB, T0, SocketEvent::Connect, 8, st(0)), T0);
    a.observe(&tcp(APP, DB, T0 + S, SocketEvent::Update, 7, st(500)), T0);
    assert_eq!(only_row(&a).open_connections, 2);
    let node = tcp(APP, DB, T0, SocketEvent::Connect, 7, st(0)).node_name;
    // 8 is still open in the kernel; 7 is gone, but only forgotten once quiet long enough.
    let alive = |cookie| cookie == 8;
    assert_eq!(a.forget_gone_sockets(&node, T0 + S, alive), 0, "7 was seen at T0 + 1 s");
    assert_eq!(a.forget_gone_sockets(&node, T0 + 2 * S, alive), 1);
    assert_eq!(a.forget_gone_sockets("another-node", T0 + 9 * S, |_| false), 0);
    let r = only_row(&a);
    assert_eq!((r.open_connections, r.bytes_to_server), (1, 500), "counted once, not again");
}

#[test]
fn failed_connects_by_cause() {
    let mut a = agg();
    for (i, cause) in ["ECONNREFUSED", "ECONNREFUSED", "ETIMEDOUT"].iter().enumerate() {
        let st = TcpStats { error: (*cause).into(), retransmits: 1, ..TcpStats::default() };
        a.observe(&tcp(APP, DB, T0, SocketEvent::ConnectFailed, i as u64, st), T0);
    }
    let r = only_row(&a);
    assert_eq!(r.connect_failures.get("ECONNREFUSED"), Some(&2));
    assert_eq!(r.connect_failures.get("ETIMEDOUT"), Some(&1));
    assert_eq!((r.connects, r.retransmits), (0, 3));
}

#[test]
fn a_dropped_reply_counts_on_the_hop_of_its_connection() {
    let mut a = agg();
    let client = ("", "10.0.0.2", 45000);
    let server = ("", "10.0.0.3", 5432);
    a.observe(&dropped(server, client, T0, "NETFILTER_DROP"), T0);
    a.observe(&dropped(client, server, T0, "NETFILTER_DROP"), T0);
    a.observe(&dropped(client, server, T0, "TCP_INVALID_SEQUENCE"), T0);
    let r = only_row(&a);
    assert_eq!(
        (r.source.name.as_str(), r.destination.name.as_str(), r.port),
        ("10.0.0.2", "10.0.0.3", 5432)
    );
    assert_eq!((r.drops_total, r.drops.get("NETFILTER_DROP")), (3, Some(&2)));
}

#[test]
fn dns_answers_by_rcode_with_nxdomain_names() {
    let mut a = agg();
    let client = ("app", "10.0.0.2", 50000);
    let dns = ("dnsmasq", "10.0.0.53", 53);
    for (rcode, query) in [(0, "db.test."), (0, "db.test."), (3, "nope.test."), (2, "x.test.")] {
        let mut f = l7(client, dns, T0, 2 * MS, false, if rcode == 0 { "" } else { "DNS error" });
        let l = f.l7.as_mut().unwrap();
        l.protocol = "dns".into();
        l.record = Some(Record::Dns(pb::Dns { query: query.into(), rcode, ..pb::Dns::default() }));
        a.observe(&f, T0);
    }
    let r = only_row(&a);
    assert_eq!((r.requests, r.errors, r.protocol.as_str()), (4, 2, "dns"));
    assert_eq!(r.dns_rcodes.get("NOERROR"), Some(&2));
    assert_eq!(r.dns_rcodes.get("NXDOMAIN"), Some(&1));
    assert_eq!(r.dns_rcodes.get("SERVFAIL"), Some(&1));
    assert_eq!(r.nxdomain.keys().collect::<Vec<_>>(), ["nope.test."]);
}

#[test]
fn the_series_limit_holds_and_overflow_keeps_the_counts() {
    let mut a = Aggregator::new(HopConfig { series_limit: 4, ..HopConfig::default() });
    for port in 0..10u32 {
        for _ in 0..3 {
            a.observe(&l7(APP, ("postgres", "10.0.0.3", 6000 + port), T0, MS, false, ""), T0);
        }
    }
    let (sides, _) = a.table().series_used();
    assert_eq!((a.table().len(), sides), (4, 4));
    let rows = view::rows(a.table(), None, 1.0);
    assert_eq!(rows.len(), 5, "4 hops and the overflow hop");
    let overflow = rows.iter().find(|r| r.source.name == endpoint::OVERFLOW).unwrap();
    assert_eq!(overflow.requests, 18, "6 hops past the limit, 3 requests each");
    assert_eq!(rows.iter().map(|r| r.requests).sum::<u64>(), 30, "nothing lost");
    // Admission is sticky: a hop admitted first keeps counting in its own series.
    a.observe(&l7(APP, ("postgres", "10.0.0.3", 6000), T0, MS, false, ""), T0);
    let rows = view::rows(a.table(), None, 1.0);
    assert_eq!(rows.iter().find(|r| r.port == 6000).unwrap().requests, 4);
}

#[test]
fn tallies_are_capped_per_hop_and_per_family() {
    let cfg = HopConfig { series_limit: 100, per_hop_values: 2, ..HopConfig::default() };
    let mut a = Aggregator::new(cfg);
    for reason in ["A", "B", "C", "D"] {
        a.observe(&dropped(APP, DB, T0, reason), T0);
    }
    let rows = view::rows(a.table(), None, 1.0);
    let own = rows.iter().find(|r| r.port == 5432).unwrap();
    assert_eq!(own.drops.len(), 2);
    let overflow = rows.iter().find(|r| r.source.name == endpoint::OVERFLOW).unwrap();
    assert_eq!(overflow.drops_total, 2);
    assert_eq!(rows.iter().map(|r| r.drops_total).sum::<u64>(), 4);
    // The overflow hop itself folds names past the cap into `_other_`.
    let mut t = stats::Tally::default();
    for k in ["x", "y", "z"] {
        t.add_capped(k, 1, 2);
    }
    assert_eq!(t.get(OTHER), 1);
}

#[test]
fn stale_hops_are_evicted_and_give_their_series_back() {
    let cfg =
        HopConfig { series_limit: 1, stale_after: Duration::from_mins(1), ..HopConfig::default() };
    let mut a = Aggregator::new(cfg);
    a.observe(&l7(APP, DB, T0, MS, false, ""), T0);
    // A hop with an open connection outlives the grace period.
    a.observe(&tcp(FRONT, APP_SVC, T0, SocketEvent::Connect, 1, TcpStats::default()), T0);
    a.sweep(T0 + 61 * S);
    assert_eq!(a.table().len(), 0, "app → postgres is stale; nginx → app overflowed (limit 1)");
    let mut a = Aggregator::new(HopConfig { series_limit: 10, ..cfg });
    a.observe(&l7(APP, DB, T0, MS, false, ""), T0);
    a.observe(&tcp(FRONT, APP_SVC, T0, SocketEvent::Connect, 1, TcpStats::default()), T0);
    a.sweep(T0 + 61 * S);
    let rows = view::rows(a.table(), Some(&a.context().ledger), 1.0);
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].destination.name.as_str(), rows[0].open_connections), ("app", 1));
    assert_eq!(a.evicted, 1);
    // Its series came back: a new hop is admitted under the limit again.
    assert_eq!(a.table().series_used().0, 1);
    // Open connections keep a hop only until they are forgotten.
    a.sweep(T0 + ledger::FORGET_AFTER_NS + 62 * S);
    assert_eq!(a.table().len(), 0);
    // Without a grace period (the CLI's one-shot table) nothing is ever evicted.
    let mut a = Aggregator::new(HopConfig { stale_after: Duration::MAX, ..HopConfig::default() });
    a.observe(&l7(APP, DB, T0, MS, false, ""), T0);
    a.observe(&l7(FRONT, APP_SVC, T0 + 3 * ledger::FORGET_AFTER_NS, MS, false, ""), T0);
    assert_eq!(a.table().len(), 2);
}

#[test]
fn the_window_keeps_only_its_span() {
    let mut w = Window::new(Duration::from_mins(1), 6, HopConfig::default());
    for i in 0..60 {
        w.observe(&l7(APP, DB, T0 + i * S, MS, false, ""), T0);
    }
    let rows = view::rows(&w.view(), None, 60.0);
    assert_eq!(rows[0].requests, 60);
    // At 90 s the window (10 s slots) holds the slots from 40 s on: 20 flows and the new one.
    w.observe(&l7(APP, DB, T0 + 90 * S, MS, false, ""), T0);
    assert_eq!(view::rows(&w.view(), None, 60.0)[0].requests, 21);
    w.observe(&l7(APP, DB, T0, MS, false, ""), T0);
    assert_eq!(w.too_old, 1);
}

#[test]
fn a_path_shows_each_hops_share_of_the_end_to_end_time() {
    let mut a = agg();
    let cache = ("redis-server", "10.0.0.4", 6379);
    for i in 0..10 {
        a.observe(&l7(FRONT, APP_SVC, T0 + i, 50 * MS, false, ""), T0);
        a.observe(&l7(APP, DB, T0 + i, 40 * MS, false, ""), T0);
        a.observe(&l7(APP, cache, T0 + i, MS, false, ""), T0);
        a.observe(&l7(APP, cache, T0 + i, MS, false, ""), T0);
    }
    let rows = view::rows(a.table(), None, 1.0);
    let ps = paths(&rows, &[]);
    assert_eq!(ps.len(), 1, "{ps:#?}");
    let p = &ps[0];
    assert_eq!(p.entry, "nginx → app:8000");
    let steps: Vec<(usize, &str, f64)> = p
        .steps
        .iter()
        .map(|s| (s.depth, s.hop.destination.name.as_str(), s.share.unwrap()))
        .collect();
    assert_eq!(steps.len(), 3);
    assert_eq!((steps[0].0, steps[0].1), (0, "app"));
    assert_eq!((steps[1].0, steps[1].1), (1, "postgres"), "largest share first");
    assert_eq!((steps[2].0, steps[2].1), (1, "redis-server"));
    assert!((steps[0].2 - 1.0).abs() < 1e-9);
    assert!((steps[1].2 - 0.8).abs() < 1e-9, "{}", steps[1].2);
    assert!((steps[2].2 - 0.04).abs() < 1e-9, "{}", steps[2].2);
    assert!((p.steps[0].self_share.unwrap() - 0.16).abs() < 1e-9, "app itself: 50 - 40 - 2 ms");
    assert!((p.steps[2].calls_per_request.unwrap() - 2.0).abs() < 1e-9);
    assert_eq!(p.steps[0].via, Via::Entry);
    assert!(p.steps[1..].iter().all(|s| s.via == Via::Endpoint), "no links: chained by program");
}

/// (depth, destination, via) of each step of each path.
fn shape(ps: &[path::Path]) -> Vec<Vec<(usize, String, Via)>> {
    ps.iter()
        .map(|p| p.steps.iter().map(|s| (s.depth, s.hop.destination.display(), s.via)).collect())
        .collect()
}

#[test]
fn an_address_shared_by_unrelated_sockets_chains_nothing() {
    // On one host: a refused connect to 127.0.0.1:9 (nothing listens, so no program names that
    // end) and a UDP drop from 127.0.0.1 to port 53. Both involve 127.0.0.1; neither called the
    // other.
    let mut a = agg();
    let refused = ("", "127.0.0.1", 9);
    a.observe(
        &tcp(
            ("curl", "127.0.0.1", 40_000),
            refused,
            T0,
            SocketEvent::ConnectFailed,
            1,
            TcpStats::default(),
        ),
        T0,
    );
    a.observe(&dropped(("", "127.0.0.1", 5353), ("", "127.0.0.1", 53), T0, "NO_SOCKET"), T0);
    let rows = view::rows(a.table(), None, 1.0);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_eq!(rows[0].destination.kind, Kind::Ip);
    let ps = paths(&rows, &[]);
    assert_eq!(ps.len(), 2, "two unrelated hops are two paths: {:#?}", shape(&ps));
    assert!(ps.iter().all(|p| p.steps.len() == 1), "{:#?}", shape(&ps));
}

/// An L7 flow carrying `span` (16 hex digits each) linked to `parent` by `link`.
fn spanned(mut f: Flow, span: u64, parent: Option<u64>, link: &str) -> Flow {
    let l7 = f.l7.as_mut().expect("an L7 flow");
    l7.span = Some(pb::Span {
        span_id: format!("{span:016x}"),
        parent_span_id: parent.map(|p| format!("{p:016x}")).unwrap_or_default(),
        link: if parent.is_some() { link.to_owned() } else { String::new() },
        unlinked: String::new(),
    });
    f
}

#[test]
fn linked_calls_go_under_the_requests_that_made_them_only() {
    // Two hops into app: nginx's requests and a health checker's. Only nginx's requests query
    // postgres (the tracer linked each query to its request); both make app call redis, which
    // the tracer could not link (an event loop). By endpoint alone postgres would hang under the
    // health checks too.
    let probe = ("kubelet", "10.0.0.9", 50_000);
    let cache = ("redis-server", "10.0.0.4", 6379);
    let mut a = Aggregator::new(HopConfig { links: true, ..HopConfig::default() });
    for i in 0..10 {
        let request = 100 + i;
        let at = T0 + i * MS;
        // Both ends of each exchange carry its span; the query's is linked to the request.
        a.observe(&spanned(l7(FRONT, APP_SVC, at, 50 * MS, false, ""), request, None, ""), T0);
        a.observe(&spanned(l7(FRONT, APP_SVC, at, 48 * MS, true, ""), request, None, ""), T0);
        let query = l7(APP, DB, at, 40 * MS, false, "");
        a.observe(&spanned(query.clone(), 200 + i, Some(request), "thread"), T0);
        a.observe(&spanned(query, 200 + i, Some(request), "thread"), T0);
        a.observe(&l7(APP, cache, at, MS, false, ""), T0);
        a.observe(&l7(probe, APP_SVC, at, 2 * MS, false, ""), T0);
    }
    let links = a.context().links.as_ref().expect("links kept");
    let (edges, counts) = links.edges();
    assert_eq!(edges.len(), 1, "{edges:#?}");
    assert_eq!((edges[0].requests, edges[0].methods["thread"]), (10, 10));
    assert_eq!((counts.spans, counts.linked, counts.parent_not_seen), (20, 10, 0));
    let rows = view::rows(a.table(), None, 1.0);
    let ps = paths(&rows, &edges);
    let got = shape(&ps);
    let nginx = vec![
        (0, "app".to_owned(), Via::Entry),
        (1, "postgres".to_owned(), Via::Link),
        (1, "redis-server".to_owned(), Via::Endpoint),
    ];
    let probes =
        vec![(0, "app".to_owned(), Via::Entry), (1, "redis-server".to_owned(), Via::Endpoint)];
    assert_eq!(got, vec![nginx, probes], "{got:#?}");
    let query = &ps[0].steps[1];
    assert_eq!(query.links.get("thread"), Some(&10));
    assert!((query.calls_per_request.unwrap() - 1.0).abs() < 1e-9);
    assert!((query.share.unwrap() - 0.8).abs() < 1e-9, "{}", query.share.unwrap());
}

#[test]
fn a_linked_hops_share_is_its_linked_part_and_unseen_parents_are_counted() {
    let mut a = Aggregator::new(HopConfig { links: true, ..HopConfig::default() });
    // 4 requests, each with a query linked to it; 4 more queries whose requests are not in the
    // flows (outside the window) and 4 malformed span ids.
    for i in 0..4 {
        let at = T0 + i * MS;
        a.observe(&spanned(l7(FRONT, APP_SVC, at, 50 * MS, false, ""), 1 + i, None, ""), T0);
        a.observe(&spanned(l7(APP, DB, at, 10 * MS, false, ""), 10 + i, Some(1 + i), "thread"), T0);
        let orphan = spanned(l7(APP, DB, at, 10 * MS, false, ""), 20 + i, Some(90 + i), "thread");
        a.observe(&orphan, T0);
        let mut bad = l7(APP, DB, at, 10 * MS, false, "");
        bad.l7.as_mut().unwrap().span =
            Some(pb::Span { span_id: "xyz".into(), ..pb::Span::default() });
        a.observe(&bad, T0);
    }
    let (edges, counts) = a.context().links.as_ref().unwrap().edges();
    assert_eq!((counts.linked, counts.parent_not_seen, counts.not_kept), (4, 4, 4));
    let rows = view::rows(a.table(), None, 1.0);
    let ps = paths(&rows, &edges);
    assert_eq!(ps.len(), 1, "{:#?}", shape(&ps));
    let db = &ps[0].steps[1];
    // 12 queries of 10 ms on the hop, 4 of them linked to these 4 requests of 50 ms.
    assert_eq!(db.hop.requests, 12);
    assert!((db.share.unwrap() - 0.2).abs() < 1e-9, "{}", db.share.unwrap());
    assert!((db.calls_per_request.unwrap() - 1.0).abs() < 1e-9);
}

#[test]
fn a_window_forgets_links_with_its_slots() {
    let cfg = HopConfig { links: true, ..HopConfig::default() };
    let mut w = Window::new(Duration::from_mins(1), 6, cfg);
    w.observe(&spanned(l7(FRONT, APP_SVC, T0, 5 * MS, false, ""), 1, None, ""), T0);
    w.observe(&spanned(l7(APP, DB, T0, MS, false, ""), 2, Some(1), "thread"), T0);
    assert_eq!(w.context().links.as_ref().unwrap().edges().1.linked, 1);
    w.advance(T0 + 120 * S);
    let (edges, counts) = w.context().links.as_ref().unwrap().edges();
    assert!(edges.is_empty() && counts.spans == 0, "{counts:?}");
}

#[test]
fn rows_sort_by_any_column_and_filter_like_observe() {
    let mut a = agg();
    a.observe(&l7(APP, DB, T0, 40 * MS, false, ""), T0);
    a.observe(&l7(FRONT, APP_SVC, T0, 5 * MS, false, ""), T0);
    a.observe(&l7(FRONT, APP_SVC, T0, 5 * MS, false, ""), T0);
    let mut rows = view::rows(a.table(), None, 1.0);
    view::sort(&mut rows, SortKey::P99, false);
    assert_eq!(rows[0].destination.name, "postgres");
    view::sort(&mut rows, SortKey::Requests, false);
    assert_eq!(rows[0].destination.name, "app");
    view::sort(&mut rows, SortKey::Destination, false);
    assert_eq!(rows[0].destination.name, "app");
    view::sort(&mut rows, SortKey::Destination, true);
    assert_eq!(rows[0].destination.name, "postgres");
    let f = RowFilter { to_ports: vec![5432], ..RowFilter::default() };
    assert_eq!(rows.iter().filter(|r| f.matches(r)).count(), 1);
    let f = RowFilter { pods: vec!["ngi".into()], ..RowFilter::default() };
    assert_eq!(rows.iter().filter(|r| f.matches(r)).count(), 1);
    let f = RowFilter { namespaces: vec!["prod".into()], ..RowFilter::default() };
    assert_eq!(rows.iter().filter(|r| f.matches(r)).count(), 0);
    assert_eq!("server-p99".parse::<SortKey>(), Ok(SortKey::ServerP99));
}

#[test]
fn flows_without_a_hop_are_ignored_not_miscounted() {
    let mut a = agg();
    assert_eq!(a.observe(&Flow::default(), T0), Outcome::Ignored);
    let mut udp = base(APP, DB, T0, true);
    udp.r#type = FlowType::L3L4.into();
    assert_eq!(a.observe(&udp, T0), Outcome::Ignored);
    assert_eq!((a.counted, a.ignored, a.table().len()), (0, 2, 0));
}

#[test]
fn tls_handshakes_and_set_ups_have_their_own_figures_not_requests() {
    let mut a = agg();
    let handshake = |latency: u64, error: &str| {
        let mut f = l7(APP, DB, T0, latency, false, error);
        let l = f.l7.as_mut().unwrap();
        l.protocol = "tls".into();
        l.record = None;
        f.tls_handshake = Some(pb::TlsHandshake {
            version: "TLS 1.3".into(),
            latency_ns: latency,
            error: error.into(),
            ..Default::default()
        });
        f
    };
    for _ in 0..9 {
        a.observe(&handshake(40 * MS, ""), T0);
    }
    a.observe(&handshake(0, "server alert: protocol_version"), T0);
    let mut first = l7(APP, DB, T0, 10 * MS, false, "");
    first.connection_setup = Some(pb::ConnectionSetup {
        dns_ns: 5 * MS,
        connect_ns: 20 * MS,
        tls_ns: 40 * MS,
        first_byte_ns: 10 * MS,
        total_ns: 80 * MS,
        ..Default::default()
    });
    a.observe(&first, T0);
    let r = only_row(&a);
    assert_eq!(
        (r.requests, r.errors, r.protocol.as_str()),
        (1, 0, "http"),
        "handshakes are not requests"
    );
    assert_eq!(r.tls_handshakes, 9);
    assert_eq!(r.client_tls_handshake.as_ref().map(|l| l.p50_ns), Some(40 * MS));
    assert_eq!(r.tls_failures.get("server alert: protocol_version"), Some(&1));
    let s = r.connection_setup.expect("one set-up");
    assert_eq!(
        (s.connections, s.mean_dns_ns, s.mean_tls_ns, s.total.max_ns),
        (1, 5 * MS, 40 * MS, 80 * MS)
    );
}
