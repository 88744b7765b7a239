//! TLS handshakes read from the records on the wire, without keys: the ClientHello and
//! ServerHello are plaintext, and so are the alerts sent before encryption starts.
//!
//! What is read:
//! - ClientHello: the server name (SNI), the ALPN protocols offered, the legacy session id, the
//!   versions offered (`supported_versions`), whether a PSK or ticket is offered.
//! - ServerHello: the version chosen (`supported_versions` for TLS 1.3), the cipher suite, the
//!   ALPN protocol chosen (plaintext up to TLS 1.2; in TLS 1.3 it is in the encrypted
//!   EncryptedExtensions, see [`Handshake`]), and whether the session was resumed: the
//!   `pre_shared_key` extension in TLS 1.3, the client's session id echoed in TLS 1.2 (also for
//!   a ticket, RFC 5077 §3.4). A HelloRetryRequest is recognised and stepped over.
//! - Alerts (plaintext ones name their description; an encrypted alert is recognised by its
//!   length only).
//!
//! **When the handshake is over**, at either end: when the first encrypted record the client
//! sends passes (its first application data in TLS 1.2; in TLS 1.3 its Finished, which it sends
//! without waiting, with or just before its first application data). So the latency from the
//! ClientHello to that record is the handshake's round trips plus both ends' processing, as each
//! end sees it.
//!
//! The agent sees the bytes as the data of individual syscalls, each possibly cut after a
//! captured prefix ([`RecordReader`]). Nothing here allocates in proportion to a length read from
//! the wire; names kept are capped.

/// Longest server name or ALPN protocol kept, in bytes.
pub const MAX_NAME: usize = 255;
/// Record body bytes kept for parsing (a ClientHello with a long extension list, or post-quantum
/// key shares, fits; what is past this is skipped).
const BODY_KEEP: usize = 4096;
/// Longest record a TLS peer may send (2^14 plus expansion).
const RECORD_MAX: usize = (1 << 14) + 2048;

pub const CONTENT_CCS: u8 = 20;
pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;

const HS_CLIENT_HELLO: u8 = 1;
const HS_SERVER_HELLO: u8 = 2;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SESSION_TICKET: u16 = 35;
const EXT_PRE_SHARED_KEY: u16 = 41;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

/// The ServerHello random that marks a HelloRetryRequest (RFC 8446 §4.1.3).
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// An encrypted alert's record: content type, alert level and description (3 bytes) plus a
/// 16-byte AEAD tag (AES-GCM, ChaCha20-Poly1305, AES-CCM), in TLS 1.3.
const ENCRYPTED_ALERT_LEN: u16 = 2 + 1 + 16;

// ============================================================================================
// Records
// ============================================================================================

/// One TLS record: its header, and as much of its body as was captured (`body.len() < len` when
/// the capture was cut).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub content_type: u8,
    pub version: u16,
    pub len: u16,
    pub body: &'a [u8],
}

/// One direction's byte stream cut into records. Fed the data of each syscall, of which the
/// first `data.len()` of `total` bytes were captured: a record whose body was cut is still
/// stepped over (its length is in its header); a record header that falls in bytes not captured
/// loses the stream, and the reader stops ([`RecordReader::lost`]).
#[derive(Debug, Default, Clone)]
pub struct RecordReader {
    header: Vec<u8>,
    /// The current record's header, once all 5 bytes are known.
    current: Option<(u8, u16, u16)>,
    body: Vec<u8>,
    /// Body bytes of the current record passed so far (captured or not).
    body_seen: usize,
    /// A body byte was not captured: what follows in `body` would not be contiguous.
    body_cut: bool,
    lost: bool,
}

impl RecordReader {
    /// Feeds one syscall's data and calls `on_record` for each record that ends in it.
    pub fn feed(&mut self, data: &[u8], total: u64, mut on_record: impl FnMut(Record<'_>)) {
        let total = usize::try_from(total).unwrap_or(usize::MAX).max(data.len());
        let mut off = 0usize;
        while off < total && !self.lost {
            let Some((content_type, version, len)) = self.current else {
                if off >= data.len() {
                    // A record starts in bytes that were not captured.
                    self.lost = true;
                    return;
                }
                let take = (5 - self.header.len()).min(data.len() - off);
                self.header.extend_from_slice(&data[off..off + take]);
                off += take;
                if self.header.len() == 5 {
                    let h = &self.header;
                    let (t, major) = (h[0], h[1]);
                    let len = u16::from_be_bytes([h[3], h[4]]);
                    if !(CONTENT_CCS..=24).contains(&t)
                        || major != 3
                        || usize::from(len) > RECORD_MAX
                    {
                        self.lost = true;
                        return;
                    }
                    let version = u16::from_be_bytes([h[1], h[2]]);
                    self.header.clear();
                    self.body.clear();
                    self.body_seen = 0;
                    self.body_cut = false;
                    if len == 0 {
                        on_record(Record { content_type: t, version, len, body: &[] });
                    } else {
                        self.current = Some((t, version, len));
                    }
                }
                continue;
            };
            let remaining = usize::from(len) - self.body_seen;
            let n = remaining.min(total - off);
            let known_end = (off + n).min(data.len());
            if off < known_end && !self.body_cut {
                let room = BODY_KEEP.saturating_sub(self.body.len());
                let keep = (known_end - off).min(room);
                self.body.extend_from_slice(&data[off..off + keep]);
            }
            if known_end < off + n {
                self.body_cut = true;
            }
            self.body_seen += n;
            off += n;
            if self.body_seen == usize::from(len) {
                self.current = None;
                on_record(Record { content_type, version, len, body: &self.body });
            }
        }
    }

    /// The stream could not be followed (a record header was not captured, or the bytes are not
    /// TLS records).
    pub fn lost(&self) -> bool {
        self.lost
    }
}

// ============================================================================================
// Hello messages
// ============================================================================================

/// What a ClientHello says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    pub server_name: String,
    pub alpn: Vec<String>,
    pub session_id: Vec<u8>,
    /// The versions offered in `supported_versions` (empty when absent: TLS 1.2 or older).
    pub versions: Vec<u16>,
    pub offers_psk: bool,
    pub offers_ticket: bool,
}

/// What a ServerHello says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerHello {
    /// The version agreed (`supported_versions` when present, else the legacy version).
    pub version: u16,
    pub cipher_suite: u16,
    pub session_id: Vec<u8>,
    /// The ALPN protocol chosen, when in the ServerHello (TLS 1.2 and older).
    pub alpn: Option<String>,
    /// The server accepted the client's pre-shared key (TLS 1.3 resumption).
    pub psk_accepted: bool,
    pub hello_retry: bool,
}

/// A byte cursor that fails (returns `None`) rather than panics.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }

    /// `n` bytes, or as many as there are.
    fn take_up_to(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.b.split_at(n.min(self.b.len()));
        self.b = rest;
        head
    }

    /// A vector with a 16-bit length, cut short if the bytes end first.
    fn vec16_up_to(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        Some(self.take_up_to(usize::from(n)))
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(MAX_NAME)]).into_owned()
}

/// The handshake message at the start of a handshake record's body: its type and as much of
/// its body as was captured (a ClientHello with a ticket or post-quantum key shares may be cut;
/// the fields read come early, except the PSK, which the ServerHello answers anyway).
fn handshake_message(body: &[u8]) -> Option<(u8, &[u8])> {
    let mut c = Cursor { b: body };
    let t = c.u8()?;
    let l = c.take(3)?;
    let len = u32::from_be_bytes([0, l[0], l[1], l[2]]) as usize;
    Some((t, c.take_up_to(len)))
}

/// Parses a ClientHello at the start of a handshake record body; `None` if it is not one.
/// Fields cut off by the capture are left empty.
pub fn client_hello(record_body: &[u8]) -> Option<ClientHello> {
    let (t, body) = handshake_message(record_body)?;
    if t != HS_CLIENT_HELLO {
        return None;
    }
    let mut c = Cursor { b: body };
    c.u16()?; // legacy_version
    c.take(32)?; // random
    let session_id = c.vec8()?.to_vec();
    c.vec16()?; // cipher_suites
    c.vec8()?; // compression_methods
    let mut hello = ClientHello { session_id, ..ClientHello::default() };
    let Some(mut exts) = c.vec16_up_to().map(|b| Cursor { b }) else { return Some(hello) };
    while let (Some(kind), Some(data)) = (exts.u16(), exts.vec16()) {
        let mut e = Cursor { b: data };
        match kind {
            EXT_SERVER_NAME => {
                let mut list = Cursor { b: e.vec16().unwrap_or_default() };
                while let (Some(name_type), Some(name)) = (list.u8(), list.vec16()) {
                    if name_type == 0 {
                        hello.server_name = text(name);
                        break;
                    }
                }
            }
            EXT_ALPN => {
                let mut list = Cursor { b: e.vec16().unwrap_or_default() };
                while let Some(p) = list.vec8() {
                    if hello.alpn.len() < 16 {
                        hello.alpn.push(text(p));
                    }
                }
            }
            EXT_SUPPORTED_VERSIONS => {
                let mut list = Cursor { b: e.vec8().unwrap_or_default() };
                while let Some(v) = list.u16() {
                    // GREASE values (RFC 8701) are not versions.
                    if v & 0x0f0f != 0x0a0a && hello.versions.len() < 16 {
                        hello.versions.push(v);
                    }
                }
            }
            EXT_PRE_SHARED_KEY => hello.offers_psk = true,
            EXT_SESSION_TICKET => hello.offers_ticket = !data.is_empty(),
            _ => {}
        }
    }
    Some(hello)
}

/// Parses a ServerHello at the start of a handshake record body.
pub fn server_hello(record_body: &[u8]) -> Option<ServerHello> {
    let (t, body) = handshake_message(record_body)?;
    if t != HS_SERVER_HELLO {
        return None;
    }
    let mut c = Cursor { b: body };
    let legacy_version = c.u16()?;
    let random = c.take(32)?;
    let session_id = c.vec8()?.to_vec();
    let cipher_suite = c.u16()?;
    c.u8()?; // compression_method
    let mut hello = ServerHello {
        version: legacy_version,
        cipher_suite,
        session_id,
        hello_retry: random == HRR_RANDOM,
        ..ServerHello::default()
    };
    let Some(mut exts) = c.vec16_up_to().map(|b| Cursor { b }) else { return Some(hello) };
    while let (Some(kind), Some(data)) = (exts.u16(), exts.vec16()) {
        let mut e = Cursor { b: data };
        match kind {
            EXT_SUPPORTED_VERSIONS => {
                if let Some(v) = e.u16() {
                    hello.version = v;
                }
            }
            EXT_ALPN => {
                let mut list = Cursor { b: e.vec16().unwrap_or_default() };
                hello.alpn = list.vec8().map(text);
            }
            EXT_PRE_SHARED_KEY => hello.psk_accepted = true,
            _ => {}
        }
    }
    Some(hello)
}

/// "TLS 1.3", "TLS 1.2", ... for a protocol version number.
pub fn version_name(v: u16) -> String {
    match v {
        0x0300 => "SSL 3.0".to_owned(),
        0x0301 => "TLS 1.0".to_owned(),
        0x0302 => "TLS 1.1".to_owned(),
        0x0303 => "TLS 1.2".to_owned(),
        0x0304 => "TLS 1.3".to_owned(),
        other => format!("0x{other:04x}"),
    }
}

/// IANA names of the cipher suites in common use; others print as hex.
pub fn cipher_suite_name(s: u16) -> String {
    let name = match s {
        0x1301 => "TLS_AES_128_GCM_SHA256",
        0x1302 => "TLS_AES_256_GCM_SHA384",
        0x1303 => "TLS_CHACHA20_POLY1305_SHA256",
        0x1304 => "TLS_AES_128_CCM_SHA256",
        0x1305 => "TLS_AES_128_CCM_8_SHA256",
        0xc02b => "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        0xc02c => "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        0xc02f => "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        0xc030 => "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        0xcca8 => "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        0xcca9 => "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        0xc009 => "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
        0xc00a => "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
        0xc013 => "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
        0xc014 => "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
        0x009c => "TLS_RSA_WITH_AES_128_GCM_SHA256",
        0x009d => "TLS_RSA_WITH_AES_256_GCM_SHA384",
        0x002f => "TLS_RSA_WITH_AES_128_CBC_SHA",
        0x0035 => "TLS_RSA_WITH_AES_256_CBC_SHA",
        0x009e => "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
        0x009f => "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
        _ => return format!("0x{s:04x}"),
    };
    name.to_owned()
}

/// Alert descriptions (RFC 8446 §6, RFC 5246 §7.2).
pub fn alert_name(d: u8) -> String {
    let name = match d {
        0 => "close_notify",
        10 => "unexpected_message",
        20 => "bad_record_mac",
        21 => "decryption_failed",
        22 => "record_overflow",
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        86 => "inappropriate_fallback",
        90 => "user_canceled",
        109 => "missing_extension",
        110 => "unsupported_extension",
        112 => "unrecognized_name",
        113 => "bad_certificate_status_response",
        115 => "unknown_psk_identity",
        116 => "certificate_required",
        120 => "no_application_protocol",
        other => return format!("alert {other}"),
    };
    name.to_owned()
}

// ============================================================================================
// Handshake
// ============================================================================================

/// Which way bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ClientToServer,
    ServerToClient,
}

/// A handshake that completed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Established {
    /// `version_name` of the version agreed.
    pub version: String,
    pub server_name: String,
    /// The ALPN protocol agreed: the ServerHello's (TLS 1.2); in TLS 1.3 the server's choice is
    /// encrypted, so this is the client's offer when it offered exactly one protocol (a server
    /// that completes the handshake agreed to it or to none), else empty.
    pub alpn: String,
    pub cipher_suite: String,
    pub resumed: bool,
    /// ClientHello → the client's first encrypted record, at this end.
    pub latency_ns: u64,
}

/// A handshake that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// What is known of it so far (server name, offered ALPN...).
    pub partial: Established,
    /// The alert's description, or why else the handshake ended.
    pub reason: String,
    /// The end that sent the alert.
    pub alert_from: Option<Dir>,
}

/// What a handshake came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Established(Established),
    Failed(Failed),
}

/// One connection's handshake, as one end sees it: fed each syscall's data in order.
#[derive(Debug, Default, Clone)]
pub struct Handshake {
    up: RecordReader,
    down: RecordReader,
    client_hello: Option<ClientHello>,
    client_hello_ns: u64,
    server_hello: Option<ServerHello>,
    done: bool,
}

impl Handshake {
    /// Feeds one syscall's data (`data` captured of `total` bytes, seen at `ts_ns`); returns the
    /// outcome once the handshake completes or fails (once).
    pub fn on_data(&mut self, dir: Dir, data: &[u8], total: u64, ts_ns: u64) -> Option<Outcome> {
        if self.done {
            return None;
        }
        let mut outcome = None;
        let reader = match dir {
            Dir::ClientToServer => &mut self.up,
            Dir::ServerToClient => &mut self.down,
        };
        let (ch, ch_ns, sh) =
            (&mut self.client_hello, &mut self.client_hello_ns, &mut self.server_hello);
        reader.feed(data, total, |r| {
            if outcome.is_some() {
                return;
            }
            outcome = on_record(dir, r, ts_ns, ch, ch_ns, sh);
        });
        if outcome.is_some() {
            self.done = true;
        }
        outcome
    }

    /// The connection closed (or was reset) at `ts_ns`: a handshake under way failed.
    pub fn on_close(&mut self, reason: &str) -> Option<Outcome> {
        if self.done || self.client_hello.is_none() {
            return None;
        }
        self.done = true;
        Some(Outcome::Failed(Failed {
            partial: self.so_far(0),
            reason: reason.to_owned(),
            alert_from: None,
        }))
    }

    /// The handshake's outcome is known (nothing more to feed).
    pub fn done(&self) -> bool {
        self.done
    }

    /// Both streams were lost before a ClientHello was seen (a connection picked up mid-way).
    pub fn hopeless(&self) -> bool {
        self.client_hello.is_none() && (self.up.lost() || self.down.lost())
    }

    fn so_far(&self, ts_ns: u64) -> Established {
        summary(self.client_hello.as_ref(), self.server_hello.as_ref(), self.client_hello_ns, ts_ns)
    }
}

fn summary(
    ch: Option<&ClientHello>,
    sh: Option<&ServerHello>,
    ch_ns: u64,
    ts_ns: u64,
) -> Established {
    let mut e = Established::default();
    if let Some(ch) = ch {
        e.server_name.clone_from(&ch.server_name);
    }
    if let Some(sh) = sh {
        e.version = version_name(sh.version);
        e.cipher_suite = cipher_suite_name(sh.cipher_suite);
        e.resumed = if sh.version >= 0x0304 {
            sh.psk_accepted
        } else {
            ch.is_some_and(|ch| !ch.session_id.is_empty() && ch.session_id == sh.session_id)
        };
        e.alpn = match (&sh.alpn, ch) {
            (Some(a), _) => a.clone(),
            (None, Some(ch)) if sh.version >= 0x0304 && ch.alpn.len() == 1 => ch.alpn[0].clone(),
            _ => String::new(),
        };
    }
    e.latency_ns = ts_ns.saturating_sub(ch_ns);
    e
}

fn on_record(
    dir: Dir,
    r: Record<'_>,
    ts_ns: u64,
    ch: &mut Option<ClientHello>,
    ch_ns: &mut u64,
    sh: &mut Option<ServerHello>,
) -> Option<Outcome> {
    match (dir, r.content_type) {
        (Dir::ClientToServer, CONTENT_HANDSHAKE) if ch.is_none() => {
            // Even one cut too short to read is the client's first flight.
            *ch = Some(client_hello(r.body).unwrap_or_default());
            *ch_ns = ts_ns;
            None
        }
        (Dir::ServerToClient, CONTENT_HANDSHAKE) if ch.is_some() && sh.is_none() => {
            // A HelloRetryRequest: the real ServerHello follows the client's second hello.
            *sh = server_hello(r.body).filter(|h| !h.hello_retry);
            None
        }
        (_, CONTENT_ALERT) if ch.is_some() && r.body.len() >= 2 => {
            // A warning-level close_notify is no failure of the handshake, but it is over.
            Some(Outcome::Failed(Failed {
                partial: summary(ch.as_ref(), sh.as_ref(), *ch_ns, ts_ns),
                reason: alert_name(r.body[1]),
                alert_from: Some(dir),
            }))
        }
        (Dir::ClientToServer, CONTENT_APPLICATION_DATA) if sh.is_some() => {
            let tls13 = sh.as_ref().is_some_and(|h| h.version >= 0x0304);
            if tls13 && r.len == ENCRYPTED_ALERT_LEN {
                // Too short for a Finished (32 bytes of MAC at least): the client refused the
                // server's flight (its certificate, usually) with an encrypted alert.
                return Some(Outcome::Failed(Failed {
                    partial: summary(ch.as_ref(), sh.as_ref(), *ch_ns, ts_ns),
                    reason: "encrypted alert (from the client)".to_owned(),
                    alert_from: Some(dir),
                }));
            }
            Some(Outcome::Established(summary(ch.as_ref(), sh.as_ref(), *ch_ns, ts_ns)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
