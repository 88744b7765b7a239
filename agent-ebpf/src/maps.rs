//! Every map the programs use, sized by the constants in `hopwatch_common::maps`, and the globals
//! userspace fills in at load time.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use hopwatch_common::{
    COUNTER_COUNT, ConnState, Counter, KernelOffsets, KernelSettings,
    maps::{CONNS_ENTRIES, DROP_IGNORE_WORDS, EVENTS_BYTES, LISTENERS_ENTRIES, ListenKey},
};

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
pub static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(CONNS_ENTRIES, 0);

#[map]
pub static LISTENERS: LruHashMap<ListenKey, ConnState> =
    LruHashMap::with_max_entries(LISTENERS_ENTRIES, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map]
pub static DROP_IGNORE: Array<u32> = Array::with_max_entries(DROP_IGNORE_WORDS, 0);

/// `[window_start_ns, sent_in_window]` per CPU.
#[map]
pub static DROP_RATE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(no_mangle)]
pub static HOPWATCH_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    sk_daddr: u16::MAX,
    sk_rcv_saddr: u16::MAX,
    sk_dport: u16::MAX,
    sk_num: u16::MAX,
    sk_family: u16::MAX,
    sk_net: u16::MAX,
    sk_v6_daddr: u16::MAX,
    sk_v6_rcv_saddr: u16::MAX,
    sk_protocol: u16::MAX,
    sk_protocol_size: 0,
    sk_err: u16::MAX,
    net_inum: u16::MAX,
    skb_head: u16::MAX,
    skb_network_header: u16::MAX,
    skb_transport_header: u16::MAX,
    skb_protocol: u16::MAX,
    skb_len: u16::MAX,
    skb_dev: u16::MAX,
    skb_sk: u16::MAX,
    dev_ifindex: u16::MAX,
    dev_nd_net: u16::MAX,
    _pad: [0; 3],
});

#[unsafe(no_mangle)]
pub static HOPWATCH_SETTINGS: Global<KernelSettings> = Global::new(KernelSettings {
    update_interval_ns: 5_000_000_000,
    drops_per_sec_per_cpu: 1000,
    self_tgid: 0,
});

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, this program is the only writer on this CPU while it runs.
        unsafe { *slot += 1 };
    }
}
