//! TLS handshakes per socket: the kernel sends a TLS connection's first records
//! (`hopwatch-ebpf/src/tls_handshake.rs`), [`hopwatch_protocols::tls::Handshake`] reads them,
//! and this keeps the outcome for the connection's later flows.
//!
//! The kernel starts a connection's capture at its ClientHello, so the direction of a socket's
//! first TLS record is client → server at that socket, whichever end it is.

use hopwatch_common::{DIR_EGRESS, DIR_INGRESS, DataEvent};
use hopwatch_proto::{compact::Compact as _, flow::TlsHandshake};
use hopwatch_protocols::tls::{Dir, Handshake, Outcome};
use rustc_hash::FxHashMap;

/// Handshakes followed at once; beyond this new ones are counted, not followed.
pub(crate) const MAX_HANDSHAKES: usize = 65_536;

/// A handshake's outcome at one socket, ready to become a flow.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Done {
    pub cookie: u64,
    pub handshake: TlsHandshake,
    /// When the outcome was seen (monotonic ns).
    pub time_ns: u64,
    /// This socket received the ClientHello.
    pub server_side: bool,
    pub pid: u32,
    pub comm: [u8; 16],
    pub cgroup_id: u64,
}

struct Conn {
    handshake: Handshake,
    /// Last record seen (monotonic ns).
    last_ns: u64,
    /// Direction (`DIR_*`) of the ClientHello at this socket.
    hello_direction: u8,
    pid: u32,
    comm: [u8; 16],
    cgroup_id: u64,
}

#[derive(Default)]
pub(crate) struct TlsTracker {
    // Keys are kernel socket cookies (not attacker-chosen): a fast non-keyed hash is fine.
    open: FxHashMap<u64, Conn>,
    /// Outcomes of connections still open, for their later flows.
    outcomes: FxHashMap<u64, TlsHandshake>,
    /// Handshakes not followed because too many were under way.
    pub overflow: u64,
}

impl TlsTracker {
    /// Gives back the room of handshakes and connections gone.
    pub(crate) fn compact(&mut self) {
        self.open.compact();
        self.outcomes.compact();
    }

    /// One TLS record event of the kernel; the handshake's outcome when this completes it.
    pub(crate) fn on_data(&mut self, ev: &DataEvent, payload: &[u8]) -> Option<Done> {
        let cookie = ev.header.socket_cookie;
        if self.outcomes.contains_key(&cookie) {
            return None;
        }
        if !self.open.contains_key(&cookie) {
            if self.open.len() >= MAX_HANDSHAKES {
                self.overflow += 1;
                return None;
            }
            self.open.insert(
                cookie,
                Conn {
                    handshake: Handshake::default(),
                    last_ns: 0,
                    hello_direction: ev.direction,
                    pid: 0,
                    comm: [0; 16],
                    cgroup_id: 0,
                },
            );
        }
        let c = self.open.get_mut(&cookie).expect("inserted above");
        c.last_ns = ev.header.timestamp_ns;
        if ev.header.tgid != 0 {
            (c.pid, c.comm, c.cgroup_id) = (ev.header.tgid, ev.comm, ev.header.cgroup_id);
        }
        let dir = match ev.direction {
            d if d == c.hello_direction => Dir::ClientToServer,
            DIR_EGRESS | DIR_INGRESS => Dir::ServerToClient,
            _ => return None,
        };
        let ts = ev.header.timestamp_ns;
        let outcome = c.handshake.on_data(dir, payload, u64::from(ev.len), ts);
        if c.handshake.hopeless() {
            self.open.remove(&cookie);
            return None;
        }
        let outcome = outcome?;
        let c = self.open.remove(&cookie).expect("present");
        Some(self.finish(cookie, &c, outcome, ts))
    }

    /// The socket closed at `ts_ns` (`reset`: by a reset): a handshake under way failed.
    pub(crate) fn close(&mut self, cookie: u64, reset: bool, ts_ns: u64) -> Option<Done> {
        self.outcomes.remove(&cookie);
        let mut c = self.open.remove(&cookie)?;
        let reason = if reset {
            "connection reset during the handshake"
        } else {
            "connection closed during the handshake"
        };
        let outcome = c.handshake.on_close(reason)?;
        let mut done = self.finish(cookie, &c, outcome, ts_ns);
        // Nothing more will be seen of this socket.
        self.outcomes.remove(&cookie);
        done.time_ns = ts_ns;
        Some(done)
    }

    /// Forgets handshakes with no record since `idle_before_ns` (a close lost with the events
    /// that were), and outcomes of sockets `alive` no longer knows: the tables stay bounded by
    /// the connections open.
    pub(crate) fn sweep(&mut self, idle_before_ns: u64, alive: impl Fn(u64) -> bool) {
        self.open.retain(|_, c| c.last_ns >= idle_before_ns);
        self.outcomes.retain(|cookie, _| alive(*cookie));
    }

    /// The handshake of a socket, once known.
    pub(crate) fn outcome(&self, cookie: u64) -> Option<&TlsHandshake> {
        self.outcomes.get(&cookie)
    }

    fn finish(&mut self, cookie: u64, c: &Conn, outcome: Outcome, ts_ns: u64) -> Done {
        let handshake = match outcome {
            Outcome::Established(e) => TlsHandshake {
                version: e.version,
                server_name: e.server_name,
                alpn: e.alpn,
                cipher_suite: e.cipher_suite,
                resumed: e.resumed,
                latency_ns: e.latency_ns,
                error: String::new(),
            },
            Outcome::Failed(f) => {
                let from = match f.alert_from {
                    None => "",
                    Some(Dir::ClientToServer) => "client alert: ",
                    Some(Dir::ServerToClient) => "server alert: ",
                };
                TlsHandshake {
                    version: f.partial.version,
                    server_name: f.partial.server_name,
                    alpn: f.partial.alpn,
                    cipher_suite: f.partial.cipher_suite,
                    resumed: false,
                    latency_ns: 0,
                    error: format!("{from}{}", f.reason),
                }
            }
        };
        if self.outcomes.len() < MAX_HANDSHAKES {
            self.outcomes.insert(cookie, handshake.clone());
        }
        Done {
            cookie,
            handshake,
            time_ns: ts_ns,
            server_side: c.hello_direction == DIR_INGRESS,
            pid: c.pid,
            comm: c.comm,
            cgroup_id: c.cgroup_id,
        }
    }

    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use hopwatch_common::{EventKind, PROTO_TLS};

    use super::*;

    fn ev(cookie: u64, dir: u8, ts: u64, len: u32) -> DataEvent {
        let mut e = DataEvent::default();
        e.header.kind = EventKind::Data as u32;
        e.header.socket_cookie = cookie;
        e.header.timestamp_ns = ts;
        e.header.tgid = 7;
        e.direction = dir;
        e.len = len;
        e.captured = len;
        e.protocol = PROTO_TLS;
        e
    }

    /// A record: type, version 3.3, body.
    fn record(t: u8, body: &[u8]) -> Vec<u8> {
        let len = u16::try_from(body.len()).expect("short");
        [&[t, 3, 3][..], &len.to_be_bytes(), body].concat()
    }

    /// A minimal TLS 1.2 ClientHello / ServerHello (no extensions), session id `sid`.
    fn hello(kind: u8, sid: &[u8]) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend([0; 32]);
        b.push(u8::try_from(sid.len()).expect("short"));
        b.extend(sid);
        if kind == 1 {
            b.extend([0, 2, 0xc0, 0x2f, 1, 0]);
        } else {
            b.extend([0xc0, 0x2f, 0]);
        }
        let len = u32::try_from(b.len()).expect("short").to_be_bytes();
        let msg = [&[kind, len[1], len[2], len[3]][..], &b].concat();
        record(22, &msg)
    }

    fn feed(t: &mut TlsTracker, cookie: u64, dir: u8, ts: u64, bytes: &[u8]) -> Option<Done> {
        let len = u32::try_from(bytes.len()).expect("short");
        t.on_data(&ev(cookie, dir, ts, len), bytes)
    }

    #[test]
    fn both_ends_time_the_handshake_from_their_own_hello() {
        let mut t = TlsTracker::default();
        // Client socket 1 sends; server socket 2 receives.
        assert_eq!(feed(&mut t, 1, DIR_EGRESS, 100, &hello(1, &[9; 32])), None);
        assert_eq!(feed(&mut t, 2, DIR_INGRESS, 150, &hello(1, &[9; 32])), None);
        assert_eq!(feed(&mut t, 2, DIR_EGRESS, 160, &hello(2, &[9; 32])), None);
        assert_eq!(feed(&mut t, 1, DIR_INGRESS, 210, &hello(2, &[9; 32])), None);
        let app = record(23, &[0; 40]);
        let client = feed(&mut t, 1, DIR_EGRESS, 300, &app).expect("the client's first data");
        assert_eq!(client.handshake.version, "TLS 1.2");
        assert_eq!(client.handshake.cipher_suite, "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256");
        assert!(client.handshake.resumed, "the session id was echoed");
        assert_eq!((client.handshake.latency_ns, client.server_side), (200, false));
        let server = feed(&mut t, 2, DIR_INGRESS, 350, &app).expect("the server reads it");
        assert_eq!((server.handshake.latency_ns, server.server_side), (200, true));
        assert_eq!(t.outcome(1).map(|h| h.latency_ns), Some(200));
        assert_eq!(feed(&mut t, 1, DIR_EGRESS, 400, &app), None, "once");
        assert_eq!(t.close(1, false, 500), None, "it completed");
        assert_eq!(t.outcome(1), None, "forgotten at close");
    }

    #[test]
    fn stalled_handshakes_and_outcomes_of_forgotten_sockets_are_swept() {
        let mut t = TlsTracker::default();
        feed(&mut t, 1, DIR_EGRESS, 100, &hello(1, &[]));
        feed(&mut t, 2, DIR_EGRESS, 500, &hello(1, &[]));
        feed(&mut t, 2, DIR_INGRESS, 510, &hello(2, &[]));
        feed(&mut t, 2, DIR_EGRESS, 520, &record(23, &[0; 40])).expect("established");
        t.sweep(200, |cookie| cookie != 2);
        assert_eq!((t.open(), t.outcome(2)), (0, None));
    }

    #[test]
    fn alerts_and_resets_during_the_handshake_are_failures() {
        let mut t = TlsTracker::default();
        feed(&mut t, 1, DIR_EGRESS, 100, &hello(1, &[]));
        let alert = feed(&mut t, 1, DIR_INGRESS, 110, &record(21, &[2, 70])).expect("failed");
        assert_eq!(alert.handshake.error, "server alert: protocol_version");
        feed(&mut t, 3, DIR_EGRESS, 100, &hello(1, &[]));
        let reset = t.close(3, true, 900).expect("failed");
        assert_eq!(
            (reset.handshake.error.as_str(), reset.time_ns),
            ("connection reset during the handshake", 900)
        );
        assert_eq!(t.open(), 0);
    }
}
