use hopwatch_proto::flow::Layer7;

use super::*;

fn flow(traceparent: Option<&str>) -> Flow {
    Flow {
        l7: Some(Layer7::default()),
        trace_context: traceparent
            .map(|t| TraceContext { parent: Some(TraceParent { trace_id: t.to_owned() }) }),
        ..Flow::default()
    }
}

fn trace(f: &Flow) -> Option<&str> {
    f.trace_context.as_ref()?.parent.as_ref().map(|p| p.trace_id.as_str())
}

fn span(f: &Flow) -> &Span {
    f.l7.as_ref().and_then(|l| l.span.as_ref()).expect("a span")
}

#[test]
fn both_ends_name_an_exchange_alike_and_exchanges_apart() {
    let (c, s) = ("10.0.0.1:40000".parse().unwrap(), "10.0.0.2:80".parse().unwrap());
    assert_eq!(span_id(c, s, 3), span_id(c, s, 3));
    assert_ne!(span_id(c, s, 3), span_id(c, s, 4));
    assert_ne!(span_id(c, s, 3), span_id(s, c, 3));
}

#[test]
fn children_wait_for_their_parents_trace_and_share_it() {
    let mut t = Tracer::new(5_000_000_000);
    let mut out = Vec::new();
    // The query completes first, then the inbound request's server end, then its client end
    // (a root carrying a traceparent).
    t.admit(flow(None), 30, Link::Thread { parent: 20 }, Carried::default(), 1, &mut out);
    t.admit(flow(None), 20, Link::SameAsPeer, Carried::default(), 2, &mut out);
    assert!(out.is_empty(), "held until the root is known");
    assert_eq!(t.held(), 2);
    let root = "4bf92f3577b34da6a3ce929d0e0e4736";
    t.admit(flow(Some(root)), 20, Link::Root, Carried::default(), 3, &mut out);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|f| trace(f) == Some(root)), "{out:?}");
    let query = out.iter().find(|f| span(f).span_id == hex64(30)).expect("the query");
    assert_eq!(
        (span(query).parent_span_id.as_str(), span(query).link.as_str()),
        (hex64(20).as_str(), "thread")
    );
    // A late end of a resolved span passes at once, with the trace.
    out.clear();
    t.admit(flow(None), 30, Link::SameAsPeer, Carried::default(), 4, &mut out);
    assert_eq!(trace(&out[0]), Some(root));
    assert_eq!(t.stats.linked_thread, 1);
}

#[test]
fn a_propagated_id_links_a_call_to_the_one_request_that_carried_it() {
    let mut t = Tracer::new(5_000_000_000);
    let mut out = Vec::new();
    let header = "x-request-id";
    // The call completes first and waits for the request carrying its id.
    t.admit(flow(None), 30, Link::Header { key: 7, header }, Carried::default(), 1, &mut out);
    assert!(out.is_empty());
    // The inbound request (a root here) carried it.
    t.admit(flow(None), 20, Link::Root, Carried { ids: &[7], served: None }, 2, &mut out);
    let call = out.iter().find(|f| span(f).span_id == hex64(30)).expect("released");
    assert_eq!(span(call).parent_span_id, hex64(20));
    assert_eq!(span(call).link, "header:x-request-id");
    assert_eq!(trace(call), trace(out.iter().find(|f| span(f).span_id == hex64(20)).unwrap()));
    // A second request with the same id: the id links nothing any more.
    out.clear();
    t.admit(flow(None), 21, Link::Root, Carried { ids: &[7], served: None }, 3, &mut out);
    t.admit(flow(None), 31, Link::Header { key: 7, header }, Carried::default(), 4, &mut out);
    let late = out.iter().find(|f| span(f).span_id == hex64(31)).expect("passed through");
    assert_eq!(
        (span(late).parent_span_id.as_str(), span(late).unlinked.as_str()),
        ("", "ambiguous")
    );
    assert_eq!(t.stats.linked_header, 1);
}

#[test]
fn unlinked_and_expired_exchanges_are_counted_never_guessed() {
    let mut t = Tracer::new(100);
    let mut out = Vec::new();
    t.admit(flow(None), 7, Link::Ambiguous, Carried::default(), 0, &mut out);
    assert_eq!(span(&out[0]).unlinked, "ambiguous");
    assert_eq!(span(&out[0]).parent_span_id, "");
    assert_eq!(trace(&out[0]), Some(format!("{:032x}", derived_trace(7)).as_str()));
    out.clear();
    t.admit(flow(None), 8, Link::Thread { parent: 9 }, Carried::default(), 10, &mut out);
    t.expire(50, &mut out);
    assert!(out.is_empty());
    t.expire(110, &mut out);
    assert_eq!((span(&out[0]).unlinked.as_str(), trace(&out[0])), ("expired", None));
    assert_eq!(span(&out[0]).parent_span_id, hex64(9), "the link stays");
    assert_eq!((t.stats.ambiguous, t.stats.expired, t.held()), (1, 1, 0));
}

fn served(key: u64, from_ns: u64, to_ns: u64) -> Carried<'static> {
    Carried { ids: &[], served: Some(Served { key, from_ns, to_ns }) }
}

#[test]
fn a_coroutine_s_call_links_to_the_request_it_answered_around_the_call() {
    let mut t = Tracer::new(5_000_000_000);
    let mut out = Vec::new();
    let call = Link::Coroutine { key: 5, at_ns: 150 };
    // The query completes first and waits; the coroutine's earlier request (the object's
    // address reused) does not contain it, the next one does.
    t.admit(flow(None), 30, call, Carried::default(), 1, &mut out);
    t.admit(flow(None), 19, Link::Root, served(5, 10, 90), 2, &mut out);
    assert_eq!(t.held(), 1, "still waiting: {out:?}");
    t.admit(flow(None), 20, Link::Root, served(5, 100, 200), 3, &mut out);
    let query = out.iter().find(|f| span(f).span_id == hex64(30)).expect("released");
    assert_eq!(
        (span(query).parent_span_id.as_str(), span(query).link.as_str()),
        (hex64(20).as_str(), "coroutine")
    );
    let request = out.iter().find(|f| span(f).span_id == hex64(20)).expect("the request");
    assert_eq!(trace(query), trace(request));
    // The request known first: a call inside it links at once.
    out.clear();
    t.admit(
        flow(None),
        31,
        Link::Coroutine { key: 5, at_ns: 120 },
        Carried::default(),
        4,
        &mut out,
    );
    assert_eq!(span(&out[0]).parent_span_id, hex64(20));
    assert_eq!(t.stats.linked_coroutine, 2);
}

#[test]
fn a_coroutine_s_call_outside_every_request_it_answered_is_ambiguous() {
    let mut t = Tracer::new(100);
    let mut out = Vec::new();
    // Made before the coroutine read the request it then answered: not for it.
    t.admit(flow(None), 30, Link::Coroutine { key: 5, at_ns: 50 }, Carried::default(), 1, &mut out);
    t.admit(flow(None), 20, Link::Root, served(5, 60, 90), 2, &mut out);
    let early = out.iter().find(|f| span(f).span_id == hex64(30)).expect("released");
    assert_eq!(
        (span(early).parent_span_id.as_str(), span(early).unlinked.as_str()),
        ("", "ambiguous")
    );
    assert_eq!(trace(early), Some(format!("{:032x}", derived_trace(30)).as_str()));
    // A task that answered nothing (a child task, `asyncio.gather`): ambiguous at the hold.
    out.clear();
    t.admit(
        flow(None),
        31,
        Link::Coroutine { key: 6, at_ns: 70 },
        Carried::default(),
        10,
        &mut out,
    );
    t.expire(50, &mut out);
    assert!(out.is_empty());
    t.expire(110, &mut out);
    assert_eq!(
        (span(&out[0]).unlinked.as_str(), span(&out[0]).parent_span_id.as_str()),
        ("ambiguous", "")
    );
    assert!(trace(&out[0]).is_some(), "a trace of its own");
    assert_eq!(
        (t.stats.ambiguous, t.stats.expired, t.stats.linked_coroutine, t.held()),
        (2, 0, 0, 0)
    );
}
