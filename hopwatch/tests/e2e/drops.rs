//! Kernel packet drops: netfilter drops and packets no socket wanted, with this kernel's reason
//! names, the right 5-tuple and where in the kernel the packet died.

use std::time::Duration;

use serde_json::Value;

use crate::{
    hardening::{Metrics, http_get},
    support::{
        Pod, Testbed,
        agent::{Agent, ip_dst, ip_src, u64_at},
        serial,
    },
};

const WAIT: Duration = Duration::from_secs(15);

/// Sends `count` UDP datagrams from `from` (source port `sport`) to `to:dport`.
fn send_udp(from: &Pod, to: &Pod, sport: u16, dport: u16, count: u32) {
    let script = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{}',{sport}))\n\
         for _ in range({count}):\n    s.sendto(b'hopwatch',('{}',{dport}))\n    time.sleep(0.05)\n",
        from.ip, to.ip
    );
    from.exec(&["python3", "-c", &script]);
}

fn udp_drop<'a>(
    from: &'a Pod,
    to: &'a Pod,
    sport: u64,
    dport: u64,
) -> impl Fn(&Value) -> bool + 'a {
    move |f| {
        f["verdict"] == "DROPPED"
            && ip_src(f) == from.ip.to_string()
            && ip_dst(f) == to.ip.to_string()
            && u64_at(f, &["l4", "UDP", "source_port"]) == sport
            && u64_at(f, &["l4", "UDP", "destination_port"]) == dport
    }
}

#[test]
fn an_nft_drop_rule_yields_dropped_flows_with_the_netfilter_reason() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("sender"), tb.pod("firewalled"));
    let agent = Agent::start(&[]);
    b.nft("table inet hwtest {\n chain input {\n  type filter hook input priority 0;\n  udp dport 7777 drop\n }\n}\n");
    send_udp(&a, &b, 40123, 7777, 3);
    let f =
        agent.wait_for("a NETFILTER_DROP of the UDP datagram", WAIT, udp_drop(&a, &b, 40123, 7777));
    assert_eq!(f["kernel_drop_reason"], "NETFILTER_DROP", "{f}");
    assert_eq!(f["Type"], "L3_L4");
    assert_eq!(f["event_type"]["type"], 1, "Hubble's drop event type: {f}");
    assert_eq!(f["IP"]["ipVersion"], "IPv4");
    assert_eq!(u64_at(&f, &["netns_inode"]), b.netns_inode(), "dropped in the server's namespace");
    let location = f["kernel_drop_location"].as_str().unwrap_or_default();
    assert!(location.contains("+0x"), "symbolized kernel location, got {location:?}");
}

#[test]
fn udp_to_a_closed_port_shows_the_kernels_reason() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("sender"), tb.pod("nolistener"));
    let agent = Agent::start(&[]);
    send_udp(&a, &b, 40124, 9999, 3);
    let f = agent.wait_for("a drop of the unwanted datagram", WAIT, udp_drop(&a, &b, 40124, 9999));
    assert_eq!(f["kernel_drop_reason"], "NO_SOCKET", "{f}");
    assert!(f["Summary"].as_str().unwrap_or_default().starts_with("NO_SOCKET at "), "{f}");
}

#[test]
fn dropped_syns_name_the_tcp_five_tuple() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("c"), tb.pod("fw"));
    let agent = Agent::start(&[]);
    b.nft("table ip hwtest {\n chain input {\n  type filter hook input priority 0;\n  tcp dport 8082 drop\n }\n}\n");
    let _ = a.command(&["python3", "-c", &format!(
        "import socket\ns=socket.socket()\ns.settimeout(1.5)\ns.bind(('{}',40125))\ntry: s.connect(('{}',8082))\nexcept Exception: pass\n",
        a.ip, b.ip
    )]).status();
    let f = agent.wait_for("a dropped SYN", WAIT, |f| {
        f["verdict"] == "DROPPED"
            && ip_src(f) == a.ip.to_string()
            && u64_at(f, &["l4", "TCP", "source_port"]) == 40125
            && u64_at(f, &["l4", "TCP", "destination_port"]) == 8082
    });
    assert_eq!(ip_dst(&f), b.ip.to_string());
    assert_eq!(f["kernel_drop_reason"], "NETFILTER_DROP");
}

/// IPv6 multicast to a group no pod joined, from `from`, every 50 ms until the test bed goes:
/// each copy the bridge floods to another pod is freed by `ip6_mc_input` with `NOT_SPECIFIED`,
/// the noise fresh veths make (MLD reports, router solicitations), only steadier.
const MULTICAST_NOISE: &str = "import socket,time\n\
    s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
    i=socket.if_nametoindex('eth0')\n\
    while True:\n    s.sendto(b'noise',('ff02::4857',5000,0,i))\n    time.sleep(0.05)\n";

#[test]
fn ignored_reasons_on_fresh_veths_are_counted_not_reported() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("noisy"), tb.pod("quiet"));
    let noise = a.command(&["python3", "-c", MULTICAST_NOISE]).spawn().expect("python3 runs");
    tb.adopt(noise);
    // The noise runs before, while and after the agent starts: a drop freed with an ignored
    // reason while the agent attaches is no more reported than one later.
    std::thread::sleep(Duration::from_millis(500));
    let agent = Agent::start(&[]);
    // The line follows the hooks line that `start` waits for (after a memory release).
    let ignored = agent.announced("the reasons it does not report", |l| {
        l.split("not reported: ").nth(1).map(str::to_owned)
    });
    let ignored: Vec<&str> = ignored.split(',').collect();
    assert!(ignored.contains(&"NOT_SPECIFIED"), "{ignored:?}");
    let metrics = agent.metrics_addr();
    let before = Metrics(http_get(metrics, "/metrics")).kernel("drop_ignored");
    // A real drop next to the noise is still reported.
    send_udp(&a, &b, 40126, 9998, 3);
    agent.wait_for("a drop of the unwanted datagram", WAIT, udp_drop(&a, &b, 40126, 9998));
    std::thread::sleep(Duration::from_secs(2));
    let after = Metrics(http_get(metrics, "/metrics")).kernel("drop_ignored");
    let noise: Vec<_> = agent
        .flows()
        .into_iter()
        .filter(|f| f["verdict"] == "DROPPED")
        .filter(|f| ignored.contains(&f["kernel_drop_reason"].as_str().unwrap_or_default()))
        .collect();
    assert!(noise.is_empty(), "{} drops with an ignored reason reported: {noise:#?}", noise.len());
    // 50 ms apart for 2 s and more, each copy freed at least once: at least 40 counted.
    assert!(
        after >= before + 40,
        "the multicast noise is counted as ignored drops: drop_ignored {before} -> {after}"
    );
}

/// Kernels before 5.17 have no `reason` on `kfree_skb`; the agent's second program serves them.
/// Forced here (`--drop-hook no-reasons`, a hidden flag) on a kernel that has reasons: the drop
/// keeps its tuple and location, and says the reason is unknown rather than inventing one.
#[test]
fn without_kernel_drop_reasons_a_drop_keeps_its_tuple_and_location() {
    let _serial = serial();
    let mut tb = Testbed::new();
    let (a, b) = (tb.pod("sender"), tb.pod("firewalled"));
    let agent = Agent::start(&["--drop-hook", "no-reasons"]);
    // The capability lines come before the metrics line.
    agent.metrics_addr();
    assert!(
        agent.stderr().contains(
            "hopwatch agent: drops: on, via tp_btf/kfree_skb without drop reasons (kfree_skb has \
             them from 5.17): reason unknown on this kernel"
        ),
        "the start-up line names the hook and the missing reasons:\n{}",
        agent.stderr()
    );
    b.nft("table inet hwtest {\n chain input {\n  type filter hook input priority 0;\n  udp dport 7778 drop\n }\n}\n");
    send_udp(&a, &b, 40125, 7778, 3);
    let f = agent.wait_for("a drop of the datagram", WAIT, udp_drop(&a, &b, 40125, 7778));
    assert_eq!(f["kernel_drop_reason"], "reason unknown on this kernel", "{f}");
    let location = f["kernel_drop_location"].as_str().unwrap_or_default();
    assert!(location.starts_with("nft_do_chain+0x"), "where netfilter dropped it: {f}");
    assert_eq!(u64_at(&f, &["netns_inode"]), b.netns_inode(), "dropped in the server's namespace");
}
