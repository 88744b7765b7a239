//! Which application exchanges are recorded as flows.
//!
//! Every exchange is counted, exactly, in the hop aggregates behind `/metrics` and
//! `hopwatch hops` before this decision. Recording is what costs at a high request rate: each
//! recorded exchange is a flow in the printer, the collector queue and the flow store. So an
//! exchange is recorded when it is worth reading on its own, and the others only counted:
//!
//! - always: errors, timeouts, exchanges at least `--l7-flow-slow` slow, the first exchange of a
//!   connection, and everything while someone follows the in-process collector (`observe -f`);
//! - while the node records fewer than `--l7-flow-rate` exchanges a second: every exchange (so a
//!   node at a low rate records everything);
//! - beyond that rate: one exchange in `--l7-flow-sample`, chosen from the connection's addresses
//!   and the exchange's position on it, so both ends of a hop on this node record the same ones.
//!
//! Flows that are not exchanges (connections, drops) are always recorded. What is not recorded is
//! counted (`hopwatch_l7_exchanges_total{recorded="no"}`, the collector's status).

use std::time::Duration;

use hopwatch_proto::flow::{Flow, FlowType, Verdict};

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RecordArgs {
    /// Application exchanges recorded as flows per second (the whole node) before sampling
    /// starts; every exchange is still counted in the metrics and hops. 0 records every exchange.
    #[arg(long = "l7-flow-rate", default_value_t = 1000, value_name = "PER_SECOND")]
    pub rate: u32,
    /// Beyond --l7-flow-rate, one exchange in N is recorded (the same exchange at both ends of a
    /// hop on this node).
    #[arg(long = "l7-flow-sample", default_value_t = 100, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub sample: u32,
    /// Exchanges at least this slow are always recorded (errors, timeouts and a connection's first
    /// exchange always are).
    #[arg(long = "l7-flow-slow", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub slow: Duration,
}

impl RecordArgs {
    /// The kernel's share of `--l7-flow-rate` per CPU (0: no limit).
    pub(crate) fn per_cpu_rate(&self) -> u32 {
        let cpus = aya::util::nr_cpus().map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX).max(1));
        if self.rate == 0 { 0 } else { self.rate.div_ceil(cpus) }
    }
}

/// Why an exchange was recorded, or that it was not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Decision {
    Error,
    Slow,
    First,
    Followed,
    UnderRate,
    Sampled,
    NotRecorded,
}

impl Decision {
    pub(crate) const ALL: [Decision; 7] = [
        Decision::Error,
        Decision::Slow,
        Decision::First,
        Decision::Followed,
        Decision::UnderRate,
        Decision::Sampled,
        Decision::NotRecorded,
    ];

    /// The `reason` label of `hopwatch_l7_exchanges_total`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Decision::Error => "error",
            Decision::Slow => "slow",
            Decision::First => "first",
            Decision::Followed => "followed",
            Decision::UnderRate => "under_rate",
            Decision::Sampled => "sampled",
            Decision::NotRecorded => "not_recorded",
        }
    }
}

/// The recording decision for each flow, with running totals of each decision.
#[derive(Debug)]
pub(crate) struct RecordPolicy {
    /// Recorded exchanges per second before sampling; 0: all.
    rate: u32,
    sample: u64,
    slow_ns: u64,
    /// Exchanges the current second may still record in full.
    tokens: u32,
    second: u64,
    followed: bool,
    totals: [u64; Decision::ALL.len()],
}

impl RecordPolicy {
    pub(crate) fn new(args: &RecordArgs) -> Self {
        Self {
            rate: args.rate,
            sample: u64::from(args.sample.max(1)),
            slow_ns: u64::try_from(args.slow.as_nanos()).unwrap_or(u64::MAX),
            tokens: args.rate,
            second: 0,
            followed: false,
            totals: [0; Decision::ALL.len()],
        }
    }

    /// Someone follows the flows as they come: record everything while they do.
    pub(crate) fn set_followed(&mut self, followed: bool) {
        self.followed = followed;
    }

    /// Running totals by decision, for the metrics.
    pub(crate) fn totals(&self) -> impl Iterator<Item = (Decision, u64)> + '_ {
        Decision::ALL.iter().copied().zip(self.totals.iter().copied())
    }

    /// Exchanges measured in the kernel and not sent in full: never recorded.
    pub(crate) fn count_not_recorded(&mut self, n: u64) {
        self.totals[Decision::NotRecorded as usize] += n;
    }

    pub(crate) fn not_recorded(&self) -> u64 {
        self.totals[Decision::NotRecorded as usize]
    }

    /// Whether `flow` is recorded; `now_ns` is a monotonic clock (the rate's seconds). A call
    /// made for a request (`parent_key`: that request's sample key) is sampled with it, so a
    /// sampled request's calls are recorded and an unsampled one's are not (sampling is per
    /// trace).
    pub(crate) fn keep(&mut self, flow: &Flow, parent_key: Option<u64>, now_ns: u64) -> bool {
        if flow.r#type() != FlowType::L7 {
            return true;
        }
        let d = self.decide(flow, parent_key, now_ns);
        self.totals[d as usize] += 1;
        d != Decision::NotRecorded
    }

    fn decide(&mut self, flow: &Flow, parent_key: Option<u64>, now_ns: u64) -> Decision {
        let Some(l7) = &flow.l7 else { return Decision::Error };
        if flow.verdict() == Verdict::Error || l7.timed_out || !l7.error.is_empty() {
            return Decision::Error;
        }
        if l7.latency_ns >= self.slow_ns {
            return Decision::Slow;
        }
        if l7.exchange_index == 0 {
            return Decision::First;
        }
        if self.followed || self.rate == 0 {
            return Decision::Followed;
        }
        let second = now_ns / 1_000_000_000;
        if second != self.second {
            self.second = second;
            self.tokens = self.rate;
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            return Decision::UnderRate;
        }
        if parent_key.unwrap_or_else(|| sample_key(flow)).is_multiple_of(self.sample) {
            Decision::Sampled
        } else {
            Decision::NotRecorded
        }
    }
}

/// The same number at both ends of one exchange, and the one the kernel's exchange engine
/// computes: the connection's two ports in a fixed order and the exchange's position on it.
fn sample_key(flow: &Flow) -> u64 {
    let (sport, dport) = flow.ports().unwrap_or_default();
    let port = |p: u32| u16::try_from(p).unwrap_or(0);
    let index = flow.l7.as_ref().map_or(0, |l| l.exchange_index);
    hopwatch_common::exchange::sample_key(port(sport), port(dport), index)
}

#[cfg(test)]
mod tests {
    use hopwatch_proto::flow::{Ip, Layer4, Layer7, Tcp, layer4::Protocol};

    use super::*;

    fn policy(rate: u32, sample: u32) -> RecordPolicy {
        RecordPolicy::new(&RecordArgs { rate, sample, slow: Duration::from_millis(100) })
    }

    /// One exchange as seen from `from` (its flow's source) towards `to`.
    fn exchange(from: (&str, u32), to: (&str, u32), index: u64, latency_ms: u64) -> Flow {
        Flow {
            r#type: FlowType::L7.into(),
            verdict: Verdict::Forwarded.into(),
            ip: Some(Ip {
                source: from.0.to_owned(),
                destination: to.0.to_owned(),
                ..Ip::default()
            }),
            l4: Some(Layer4 {
                protocol: Some(Protocol::Tcp(Tcp {
                    source_port: from.1,
                    destination_port: to.1,
                    flags: None,
                })),
            }),
            l7: Some(Layer7 {
                latency_ns: latency_ms * 1_000_000,
                exchange_index: index,
                ..Layer7::default()
            }),
            ..Flow::default()
        }
    }

    const CLIENT: (&str, u32) = ("10.0.0.1", 40_000);
    const SERVER: (&str, u32) = ("10.0.0.2", 80);

    #[test]
    fn under_the_rate_every_exchange_is_recorded_then_one_in_n_plus_what_matters() {
        let mut p = policy(100, 10);
        let second = 5_000_000_000;
        let kept =
            (1..=100).filter(|i| p.keep(&exchange(CLIENT, SERVER, *i, 1), None, second)).count();
        assert_eq!(kept, 100, "the first 100 of the second are all recorded");
        let sampled = (101..=10_100)
            .filter(|i| p.keep(&exchange(CLIENT, SERVER, *i, 1), None, second))
            .count();
        assert!((800..=1200).contains(&sampled), "about one in 10 sampled: {sampled}");
        // Whatever the rate: errors, slow ones, a connection's first.
        let mut error = exchange(CLIENT, SERVER, 20_000, 1);
        error.verdict = Verdict::Error.into();
        assert!(p.keep(&error, None, second));
        assert!(p.keep(&exchange(CLIENT, SERVER, 20_001, 150), None, second));
        assert!(p.keep(&exchange(("10.0.0.3", 40_001), SERVER, 0, 1), None, second));
        // A new second, a new budget.
        assert!(p.keep(&exchange(CLIENT, SERVER, 30_000, 1), None, second + 1_000_000_000));
        let totals: std::collections::HashMap<_, _> = p.totals().collect();
        assert_eq!(totals[&Decision::UnderRate], 101);
        assert_eq!(totals[&Decision::Sampled], sampled as u64);
        assert_eq!(totals[&Decision::NotRecorded], 10_000 - sampled as u64);
        assert_eq!(p.not_recorded(), 10_000 - sampled as u64);
        assert_eq!(
            (totals[&Decision::Error], totals[&Decision::Slow], totals[&Decision::First]),
            (1, 1, 1)
        );
        assert_eq!(totals.values().sum::<u64>(), 10_104, "every exchange has one decision");
    }

    #[test]
    fn both_ends_of_a_hop_sample_the_same_exchanges() {
        let (mut client, mut server) = (policy(1, 7), policy(1, 7));
        client.keep(&exchange(CLIENT, SERVER, 1, 1), None, 0);
        server.keep(&exchange(SERVER, CLIENT, 1, 1), None, 0);
        for i in 2..2000 {
            assert_eq!(
                client.keep(&exchange(CLIENT, SERVER, i, 1), None, 0),
                server.keep(&exchange(SERVER, CLIENT, i, 1), None, 0),
                "exchange {i}"
            );
        }
        assert!(client.totals().any(|(d, n)| d == Decision::Sampled && n > 200));
    }

    #[test]
    fn connections_and_drops_are_always_recorded_and_followers_get_everything() {
        let mut p = policy(1, 1_000_000);
        let tcp = Flow { r#type: FlowType::L3L4.into(), ..Flow::default() };
        assert!((0..100).all(|_| p.keep(&tcp, None, 0)));
        assert_eq!(p.totals().map(|(_, n)| n).sum::<u64>(), 0, "not exchanges");
        p.keep(&exchange(CLIENT, SERVER, 1, 1), None, 0);
        assert!(!p.keep(&exchange(CLIENT, SERVER, 2, 1), None, 0));
        p.set_followed(true);
        assert!(p.keep(&exchange(CLIENT, SERVER, 3, 1), None, 0));
        let mut all = policy(0, 1_000_000);
        assert!((1..1000).all(|i| all.keep(&exchange(CLIENT, SERVER, i, 1), None, 0)));
    }

    #[test]
    fn a_call_is_sampled_with_the_request_it_was_made_for() {
        let mut p = policy(1, 10);
        let second = 5_000_000_000;
        p.keep(&exchange(CLIENT, SERVER, 1, 1), None, second);
        // Calls whose own key is not the sample's, made for requests whose key is (and not).
        let own_out =
            (2..100).find(|&i| !sample_key(&exchange(CLIENT, SERVER, i, 1)).is_multiple_of(10));
        let call = exchange(CLIENT, SERVER, own_out.unwrap(), 1);
        assert!(p.keep(&call, Some(30), second), "recorded with its sampled request");
        assert!(!p.keep(&call, Some(31), second), "not recorded without it");
    }
}
