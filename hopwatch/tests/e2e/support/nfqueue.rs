//! A per-packet delayer on an NFQUEUE queue: every packet iptables sends to the queue is held
//! until `arrival + delay`, then accepted. This kernel has no netem, and this gives a precise
//! delay (the verdict is sent by a timer, never by sleeping in the receive path, so packets do not
//! queue behind each other).
//!
//! The netlink protocol is small enough to speak directly (include/uapi/linux/netfilter/
//! `nfnetlink_queue.h)`: bind the queue, ask for metadata only, read packet ids, send verdicts.

#![expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "netlink header fields have fixed C widths; values are small by construction"
)]

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NF_ACCEPT: u32 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;

/// A running delayer; stopping it accepts every packet still held.
pub(crate) struct Delayer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<u64>>>,
}

impl Delayer {
    /// Starts a delayer bound to `queue` inside the network namespace at `netns_path`. Returns
    /// once the queue is bound, so iptables rules sending to it can be added right after.
    pub(crate) fn start(netns_path: String, queue: u16, delay: Duration) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name(format!("nfq-delay-{queue}")).spawn({
            let stop = stop.clone();
            move || {
                let sock = match setup(&netns_path, queue) {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                run(&sock, queue, delay, &stop)
            }
        })?;
        ready_rx.recv().map_err(|_| io::Error::other("delayer thread died"))??;
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Stops the delayer; returns how many packets it delayed.
    pub(crate) fn stop(&mut self) -> io::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| io::Error::other("delayer thread panicked"))?,
            None => Ok(0),
        }
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn setup(netns_path: &str, queue: u16) -> io::Result<OwnedFd> {
    let ns = std::fs::File::open(netns_path)?;
    // SAFETY: a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_NETFILTER) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid socket we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_nl is valid; family set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: valid address and length.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Bind the queue (pf AF_UNSPEC), then ask for packet metadata only.
    send(&sock, NFQNL_MSG_CONFIG, queue, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0])?;
    let mut params = 0u32.to_be_bytes().to_vec();
    params.push(NFQNL_COPY_META);
    send(&sock, NFQNL_MSG_CONFIG, queue, NFQA_CFG_PARAMS, &params)?;
    // SAFETY: fcntl on our own fd.
    unsafe {
        let flags = libc::fcntl(sock.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(sock.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    Ok(sock)
}

/// Sends one nfnetlink queue message carrying a single attribute.
fn send(sock: &OwnedFd, msg: u16, queue: u16, attr: u16, payload: &[u8]) -> io::Result<()> {
    let attr_len = 4 + payload.len();
    let total = 16 + 4 + attr_len.next_multiple_of(4);
    let mut buf = Vec::with_capacity(total);
    buf.extend_from_slice(&(total as u32).to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
    buf.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // seq
    buf.extend_from_slice(&0u32.to_ne_bytes()); // portid
    buf.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]); // nfgenmsg: family, version
    buf.extend_from_slice(&queue.to_be_bytes()); // res_id
    buf.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    buf.extend_from_slice(&attr.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(total, 0);
    // SAFETY: valid buffer and length.
    let n = unsafe { libc::send(sock.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn verdict_accept(sock: &OwnedFd, queue: u16, id: u32) -> io::Result<()> {
    let mut hdr = NF_ACCEPT.to_be_bytes().to_vec();
    hdr.extend_from_slice(&id.to_be_bytes());
    send(sock, NFQNL_MSG_VERDICT, queue, NFQA_VERDICT_HDR, &hdr)
}

/// Packet ids in one receive buffer.
fn parse_packets(buf: &[u8], ids: &mut Vec<u32>) -> io::Result<()> {
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        if len < 16 || off + len > buf.len() {
            break;
        }
        let body = &buf[off + 16..off + len];
        if ty == NLMSG_ERROR {
            let errno = i32::from_ne_bytes(body[..4].try_into().unwrap());
            if errno != 0 {
                return Err(io::Error::from_raw_os_error(-errno));
            }
        } else if ty == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET && body.len() > 4 {
            let mut a = 4; // skip nfgenmsg
            while a + 4 <= body.len() {
                let alen = u16::from_ne_bytes(body[a..a + 2].try_into().unwrap()) as usize;
                let atype = u16::from_ne_bytes(body[a + 2..a + 4].try_into().unwrap()) & 0x7fff;
                if alen < 4 || a + alen > body.len() {
                    break;
                }
                if atype == NFQA_PACKET_HDR && alen >= 8 {
                    ids.push(u32::from_be_bytes(body[a + 4..a + 8].try_into().unwrap()));
                }
                a += alen.next_multiple_of(4);
            }
        }
        off += len.next_multiple_of(4);
    }
    Ok(())
}

fn run(sock: &OwnedFd, queue: u16, delay: Duration, stop: &AtomicBool) -> io::Result<u64> {
    let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut ids = Vec::new();
    let mut delayed = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            for (_, id) in held.drain(..) {
                verdict_accept(sock, queue, id)?;
            }
            return Ok(delayed);
        }
        let now = Instant::now();
        let wait = held
            .front()
            .map_or(Duration::from_millis(20), |(due, _)| due.saturating_duration_since(now))
            .min(Duration::from_millis(20));
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as i64,
            tv_nsec: i64::from(wait.subsec_nanos()),
        };
        let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, a valid timeout, no signal mask change.
        unsafe { libc::ppoll(&raw mut pfd, 1, &raw const ts, std::ptr::null()) };
        loop {
            // SAFETY: valid buffer; non-blocking socket.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(e);
            }
            let arrival = Instant::now();
            ids.clear();
            parse_packets(&buf[..n as usize], &mut ids)?;
            for id in &ids {
                held.push_back((arrival + delay, *id));
                delayed += 1;
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, id) = held.pop_front().expect("checked non-empty");
            verdict_accept(sock, queue, id)?;
        }
    }
}
