//! Kernel packet drops from `skb:kfree_skb`.
//!
//! Why this hook: since 5.17 `kfree_skb` carries an `enum skb_drop_reason`, and every path that
//! drops a packet on purpose (netfilter, no socket, bad checksum, full backlog, ...) goes through
//! it with its reason. We attach it as `tp_btf` to get the typed `struct sk_buff *` and read the
//! packet's headers at BTF-derived offsets. Reason *names* are not compiled in — they differ
//! between kernels — userspace reads them from BTF. Reasons that are not really drops
//! (`NOT_SPECIFIED`, frees on socket close, ...) are filtered here through a bitmap userspace
//! fills from its configuration, and what remains is rate limited per CPU, so a flood costs a
//! counter increment per packet, not an event. Kernels before 5.17 have no reason argument:
//! [`kfree_skb_no_reason`] reports their drops with the tuple and location only.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use hopwatch_common::{
    AF_INET, AF_INET6, Counter, DROP_F_NO_HEADERS, DROP_REASON_MAX, DropEvent, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, KernelOffsets, Tuple,
};

use crate::{
    emit::{reserve, wakeup_flags},
    kernel::{Mem, UNSET, net_inum, offsets, read_at},
    maps::{DROP_IGNORE, DROP_RATE, HOPWATCH_SETTINGS, count},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const NSEC_PER_SEC: u64 = 1_000_000_000;

#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    let reason: u32 = ctx.arg(2);
    count(Counter::KfreeSkbCalls);
    if ignored(reason) {
        count(Counter::DropIgnored);
        return 0;
    }
    on_drop(skb, location, reason);
    0
}

/// `kfree_skb` on kernels before 5.17, whose tracepoint has no `reason` argument (the verifier
/// refuses a read of a third argument there). Every free is reported, with the packet's tuple and
/// the dropping function; userspace, which chose this variant, names the reason as unknown.
/// Before 5.17 frees that are not losses went through `consume_skb`, so there is nothing to
/// filter by reason.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_no_reason(ctx: BtfTracePointContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    count(Counter::KfreeSkbCalls);
    on_drop(skb, location, 0);
    0
}

#[inline(always)]
fn ignored(reason: u32) -> bool {
    if reason >= DROP_REASON_MAX {
        return false;
    }
    DROP_IGNORE.get(reason / 32).is_some_and(|word| word & (1 << (reason % 32)) != 0)
}

/// True if this CPU may send another drop event in the current one-second window.
#[inline(always)]
fn within_rate(now: u64) -> bool {
    let Some(state) = DROP_RATE.get_ptr_mut(0) else {
        return false;
    };
    let limit = u64::from(HOPWATCH_SETTINGS.load().drops_per_sec_per_cpu);
    // SAFETY: per-CPU map value, only this program touches it on this CPU.
    unsafe {
        if now.saturating_sub((*state)[0]) >= NSEC_PER_SEC {
            (*state)[0] = now;
            (*state)[1] = 0;
        }
        if (*state)[1] >= limit {
            return false;
        }
        (*state)[1] += 1;
    }
    true
}

#[inline(always)]
fn on_drop(skb: *const u8, location: u64, reason: u32) {
    let o = offsets();
    let eth_proto = u16::from_be(read_at::<u16>(skb, o.skb_protocol).unwrap_or(0));
    if eth_proto != ETH_P_IP && eth_proto != ETH_P_IPV6 {
        // ARP, unix-socket and other non-IP frees: not network drops we can name a flow for.
        count(Counter::DropIgnored);
        return;
    }
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if !within_rate(now) {
        count(Counter::DropRateLimited);
        return;
    }
    let Some(mut entry) = reserve::<DropEvent>(now, 0) else {
        return;
    };
    // SAFETY: `reserve` initialised every byte of the slot.
    let e = unsafe { entry.assume_init_mut() };
    // Reads of the packet go through `read_at`: a bad pointer is an error, not a crash.
    e.location = location;
    e.reason = reason;
    e.len = read_at::<u32>(skb, o.skb_len).unwrap_or(0);
    if let Some(dev) = read_at::<*const u8>(skb, o.skb_dev)
        && !dev.is_null()
    {
        e.ifindex = read_at::<u32>(dev, o.dev_ifindex).unwrap_or(0);
        if let Some(net) = read_at::<*const u8>(dev, o.dev_nd_net) {
            // SAFETY: read through the probe helper.
            e.tuple.netns = unsafe { net_inum(Mem::Probe, net) };
        }
    }
    if e.tuple.netns == 0
        && let Some(sk) = read_at::<*const u8>(skb, o.skb_sk)
        && let Some(net) = read_at::<*const u8>(sk, o.sk_net)
    {
        // SAFETY: read through the probe helper.
        e.tuple.netns = unsafe { net_inum(Mem::Probe, net) };
    }
    if !read_headers(skb, &o, e) {
        e.flags |= DROP_F_NO_HEADERS;
    }
    entry.submit(wakeup_flags());
}

/// Fills the event's tuple (and ICMP type/code) from the packet's IP and L4 headers.
#[inline(always)]
fn read_headers(skb: *const u8, o: &KernelOffsets, e: &mut DropEvent) -> bool {
    let Some(head) = read_at::<*const u8>(skb, o.skb_head) else {
        return false;
    };
    let Some(nh) = read_at::<u16>(skb, o.skb_network_header) else {
        return false;
    };
    if head.is_null() || nh == UNSET {
        return false;
    }
    let th = read_at::<u16>(skb, o.skb_transport_header).unwrap_or(UNSET);
    // Where the kernel says the network header is; only ever read through `read_at`.
    let ip = head.wrapping_add(nh as usize);
    let Some(first) = read_at::<u8>(ip, 0) else {
        return false;
    };
    let t: &mut Tuple = &mut e.tuple;
    let l4_off: u16;
    match first >> 4 {
        4 => {
            // struct iphdr: protocol at 9, saddr at 12, daddr at 16.
            let ihl = u16::from(first & 0x0f) * 4;
            let Some(hdr) = read_at::<[u8; 20]>(ip, 0) else {
                return false;
            };
            t.family = AF_INET;
            t.protocol = hdr[9];
            t.saddr[..4].copy_from_slice(&hdr[12..16]);
            t.daddr[..4].copy_from_slice(&hdr[16..20]);
            l4_off = if th != UNSET && th > nh { th - nh } else { ihl };
        }
        6 => {
            // struct ipv6hdr: nexthdr at 6, saddr at 8, daddr at 24. Extension headers are not
            // walked: the transport header offset, when set, already skips them.
            let Some(hdr) = read_at::<[u8; 40]>(ip, 0) else {
                return false;
            };
            t.family = AF_INET6;
            t.protocol = hdr[6];
            t.saddr.copy_from_slice(&hdr[8..24]);
            t.daddr.copy_from_slice(&hdr[24..40]);
            l4_off = if th != UNSET && th > nh { th - nh } else { 40 };
        }
        _ => return false,
    }
    // The transport header, likewise only read through `read_at`.
    let l4 = ip.wrapping_add(l4_off as usize);
    match t.protocol {
        IPPROTO_TCP | IPPROTO_UDP => {
            if let Some(ports) = read_at::<[u8; 4]>(l4, 0) {
                t.sport = u16::from_be_bytes([ports[0], ports[1]]);
                t.dport = u16::from_be_bytes([ports[2], ports[3]]);
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            if let Some(tc) = read_at::<[u8; 2]>(l4, 0) {
                e.icmp_type = tc[0];
                e.icmp_code = tc[1];
            }
        }
        _ => {}
    }
    true
}
