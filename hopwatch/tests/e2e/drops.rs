//! Kernel packet drops: netfilter drops and packets no socket wanted, with this kernel's reason
//! names, the right 5-tuple and where in the kernel the packet died.

use std::time::Duration;

use serde_json::Value;

use crate::support::{
    Pod, Testbed,
    agent::{Agent, ip_dst, ip_src, u64_at},
    serial,
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
