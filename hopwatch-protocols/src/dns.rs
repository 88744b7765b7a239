//! DNS messages (RFC 1035): over UDP one datagram is one message; over TCP each message has a
//! 2-byte length prefix.
//!
//! Kept: id, the first question's name and type, rcode, and from the answer section the A/AAAA
//! addresses, CNAME targets, record types and the lowest TTL (at most [`MAX_ANSWERS`] records
//! are read). Names are decoded with compression pointers followed only backwards, at most
//! [`MAX_POINTERS`] times and within 255 bytes of name, so a hostile message cannot loop or read
//! out of bounds. A UDP datagram whose capture was cut short keeps what its captured part says.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use super::{Frame, ParseError};

/// Answer records read per message.
pub const MAX_ANSWERS: usize = 32;
/// Compression pointers followed per name.
pub const MAX_POINTERS: usize = 16;
/// Longest name in wire form (RFC 1035 section 2.3.4).
const MAX_NAME: usize = 255;

const fn malformed(reason: &'static str) -> ParseError {
    ParseError::Malformed { protocol: "dns", reason }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    /// Messages prefixed with their 2-byte length.
    Tcp,
}

/// One DNS message (query or response).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    pub response: bool,
    pub rcode: u8,
    /// First question's name, dot-terminated ("www.example.com."); empty without a question.
    pub query: String,
    /// First question's type (1 = A, 28 = AAAA, ...).
    pub qtype: u16,
    /// A and AAAA addresses in the answer section.
    pub ips: Vec<String>,
    /// CNAME targets in the answer section, dot-terminated.
    pub cnames: Vec<String>,
    /// Types of the answer records, in order.
    pub rrtypes: Vec<u16>,
    /// Lowest TTL of the answer records; 0 without answers.
    pub ttl: u32,
}

/// The DNS state of one connection or UDP flow.
#[derive(Debug)]
pub struct Parser {
    transport: Transport,
}

impl Parser {
    pub fn new(transport: Transport) -> Self {
        Parser { transport }
    }

    pub fn request(&mut self, buf: &[u8]) -> Result<Frame<Message>, ParseError> {
        self.frame(buf, false)
    }

    pub fn response(
        &mut self,
        buf: &[u8],
        _pending: Option<&Message>,
    ) -> Result<Frame<Message>, ParseError> {
        self.frame(buf, true)
    }

    fn frame(&self, buf: &[u8], response: bool) -> Result<Frame<Message>, ParseError> {
        let (msg_bytes, len) = match self.transport {
            Transport::Udp => (buf, buf.len()),
            Transport::Tcp => {
                let Some(prefix) = buf.get(..2) else { return Ok(Frame::Incomplete) };
                let n = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
                if n < 12 {
                    return Err(malformed("TCP message shorter than a header"));
                }
                // At most 64 KiB, and the answers are the point: wait for all of it.
                let Some(msg) = buf.get(2..2 + n) else { return Ok(Frame::Incomplete) };
                (msg, 2 + n)
            }
        };
        if msg_bytes.len() < 12 {
            return if self.transport == Transport::Udp && !msg_bytes.is_empty() {
                Err(malformed("datagram shorter than a header"))
            } else {
                Ok(Frame::Incomplete)
            };
        }
        let msg = parse(msg_bytes)?;
        if msg.response != response {
            return Err(malformed(if response {
                "query where a response was expected"
            } else {
                "response where a query was expected"
            }));
        }
        Ok(Frame::Complete { msg, len })
    }
}

/// Reads a message; fields past the end of a cut-short buffer are left empty.
pub fn parse(b: &[u8]) -> Result<Message, ParseError> {
    let header = b.get(..12).ok_or(malformed("shorter than a header"))?;
    let word = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let flags = word(2);
    let (qdcount, ancount) = (word(4), word(6));
    if (flags >> 11) & 0xF > 6 {
        return Err(malformed("unknown opcode"));
    }
    // Real messages carry one question; more would be a misparse of something else.
    if qdcount > 4 || (flags & 0x8000 == 0 && ancount > 64) {
        return Err(malformed("implausible record counts"));
    }
    let mut msg = Message {
        id: word(0),
        response: flags & 0x8000 != 0,
        rcode: u8::try_from(flags & 0xF).unwrap_or_default(),
        ..Message::default()
    };
    let mut pos = 12;
    for i in 0..qdcount {
        let end = match name_end(b, pos) {
            Ok(end) => end,
            Err(NameError::Truncated) => return Ok(msg),
            Err(NameError::Bad(e)) => return Err(e),
        };
        if i == 0 {
            msg.query = read_name(b, pos)?;
            if let Some(t) = b.get(end..end + 2) {
                msg.qtype = u16::from_be_bytes([t[0], t[1]]);
            }
        }
        pos = end + 4;
    }
    let mut min_ttl = None;
    for _ in 0..usize::from(ancount).min(MAX_ANSWERS) {
        let end = match name_end(b, pos) {
            Ok(end) => end,
            Err(NameError::Truncated) => break,
            Err(NameError::Bad(e)) => return Err(e),
        };
        let Some(fixed) = b.get(end..end + 10) else { break };
        let rrtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let rdata_at = end + 10;
        let rdata = b.get(rdata_at..rdata_at + rdlen);
        msg.rrtypes.push(rrtype);
        min_ttl = Some(min_ttl.map_or(ttl, |m: u32| m.min(ttl)));
        match (rrtype, rdata) {
            (1, Some(&[a, b1, c, d])) => msg.ips.push(Ipv4Addr::new(a, b1, c, d).to_string()),
            (28, Some(r)) if r.len() == 16 => {
                let octets: [u8; 16] = r.try_into().unwrap_or_default();
                msg.ips.push(Ipv6Addr::from(octets).to_string());
            }
            (5, Some(_)) => msg.cnames.push(read_name(b, rdata_at)?),
            (_, None) => break,
            _ => {}
        }
        pos = rdata_at + rdlen;
    }
    msg.ttl = min_ttl.unwrap_or(0);
    Ok(msg)
}

enum NameError {
    Truncated,
    Bad(ParseError),
}

/// Offset after the name at `pos` in the message (its labels up to a zero byte or a pointer).
fn name_end(b: &[u8], mut pos: usize) -> Result<usize, NameError> {
    let start = pos;
    loop {
        let &len = b.get(pos).ok_or(NameError::Truncated)?;
        match len {
            0 => return Ok(pos + 1),
            1..=63 => pos += 1 + usize::from(len),
            0xC0..=0xFF => {
                return if pos + 2 <= b.len() { Ok(pos + 2) } else { Err(NameError::Truncated) };
            }
            _ => return Err(NameError::Bad(malformed("bad label type"))),
        }
        if pos - start > MAX_NAME {
            return Err(NameError::Bad(malformed("name too long")));
        }
    }
}

/// The name at `pos`, dot-terminated, following compression pointers safely. Bytes outside
/// printable ASCII (and `.` or `\` inside a label) are written as `\DDD`, as `dig` does.
fn read_name(b: &[u8], mut pos: usize) -> Result<String, ParseError> {
    let mut out = String::new();
    let mut wire_len = 0;
    let mut jumps = 0;
    loop {
        let &len = b.get(pos).ok_or(malformed("name runs past the message"))?;
        match len {
            0 => break,
            1..=63 => {
                let label = b
                    .get(pos + 1..pos + 1 + usize::from(len))
                    .ok_or(malformed("name runs past the message"))?;
                wire_len += 1 + label.len();
                if wire_len > MAX_NAME {
                    return Err(malformed("name too long"));
                }
                for &c in label {
                    if c.is_ascii_graphic() && c != b'.' && c != b'\\' {
                        out.push(char::from(c));
                    } else {
                        let _ = write!(out, "\\{c:03}");
                    }
                }
                out.push('.');
                pos += 1 + label.len();
            }
            0xC0..=0xFF => {
                let &low = b.get(pos + 1).ok_or(malformed("name runs past the message"))?;
                let target = usize::from(len & 0x3F) << 8 | usize::from(low);
                // Only backwards: every pointer in a message an encoder writes points to a name
                // seen earlier, and this alone rules out loops.
                if target >= pos || jumps >= MAX_POINTERS {
                    return Err(malformed("bad compression pointer"));
                }
                jumps += 1;
                pos = target;
            }
            _ => return Err(malformed("bad label type")),
        }
    }
    if out.is_empty() {
        out.push('.');
    }
    Ok(out)
}

/// Name of a record type, for records ("A", "AAAA"); numeric ones as `TYPE65`.
pub fn type_name(t: u16) -> String {
    match t {
        1 => "A".into(),
        2 => "NS".into(),
        5 => "CNAME".into(),
        6 => "SOA".into(),
        12 => "PTR".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        28 => "AAAA".into(),
        33 => "SRV".into(),
        41 => "OPT".into(),
        64 => "SVCB".into(),
        65 => "HTTPS".into(),
        255 => "ANY".into(),
        _ => format!("TYPE{t}"),
    }
}

/// Name of a response code, as `dig` shows it.
pub fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        _ => format!("RCODE{rcode}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_loops_and_forward_pointers_are_rejected() {
        let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        m.extend_from_slice(b"\x01a\x00\x00\x01\x00\x01");
        // Answer whose name points at itself.
        m.extend_from_slice(&[0xC0, 0x0C, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xC0, 0x1F]);
        assert!(parse(&m).is_err());
        // A pointer chain that ends in a label-type error.
        let mut n = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0, 0x80];
        n.extend_from_slice(&[0, 1, 0, 1]);
        assert!(parse(&n).is_err());
    }

    #[test]
    fn tcp_prefix_and_cut_datagrams() {
        let mut p = Parser::new(Transport::Tcp);
        assert_eq!(p.request(&[0]), Ok(Frame::Incomplete));
        let q = b"\x00\x1a\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x04test\x00\x00\x1c\x00\x01";
        let Ok(Frame::Complete { msg, len }) = p.request(q) else { panic!("query") };
        assert_eq!((msg.id, msg.query.as_str(), msg.qtype, len), (0xbeef, "www.test.", 28, 28));
        let mut u = Parser::new(Transport::Udp);
        let Ok(Frame::Complete { msg, .. }) = u.request(&q[2..20]) else { panic!("cut query") };
        assert_eq!(msg.query, "");
        assert!(u.response(&q[2..], None).is_err());
    }
}
