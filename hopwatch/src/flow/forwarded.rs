//! The real client behind a proxy: an ingress (nginx, Caddy, cloudflared, a load balancer) opens
//! its own connection to the app, so the app's socket only sees the proxy. Proxies say who the
//! client was in a request header; anyone can write one, so the header is believed only on a
//! request whose peer is one of the `--trusted-proxies`.

use std::net::IpAddr;

use hopwatch_proto::flow::HttpHeader;
use ipnet::IpNet;

/// `--trusted-proxies`: the addresses whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self(nets)
    }

    /// Every address (for fuzzing: every request's headers are parsed).
    pub fn everyone() -> Self {
        Self(vec![IpNet::V4(ipnet::Ipv4Net::default()), IpNet::V6(ipnet::Ipv6Net::default())])
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client a request received from `peer` was made for, from its headers: `None` when
    /// the peer is not a trusted proxy or no header names a client. `CF-Connecting-IP` and
    /// `X-Real-IP` name it directly; in `X-Forwarded-For` (and `Forwarded`'s `for=`) each proxy
    /// appends the address it got the request from, so the client is the last address that is
    /// not itself a trusted proxy.
    pub fn client(&self, peer: IpAddr, headers: &[HttpHeader]) -> Option<IpAddr> {
        if self.0.is_empty() || !self.trusts(peer) {
            return None;
        }
        let header = |name: &str| {
            headers.iter().find(|h| h.key.eq_ignore_ascii_case(name)).map(|h| h.value.as_str())
        };
        for direct in ["cf-connecting-ip", "x-real-ip"] {
            if let Some(ip) = header(direct).and_then(parse_ip) {
                return Some(ip);
            }
        }
        let chain: Vec<IpAddr> = if let Some(v) = header("x-forwarded-for") {
            v.split(',').filter_map(parse_ip).collect()
        } else if let Some(v) = header("forwarded") {
            v.split(',')
                .filter_map(|hop| {
                    hop.split(';').find_map(|kv| {
                        let (k, v) = kv.trim().split_once('=')?;
                        k.eq_ignore_ascii_case("for").then(|| parse_ip(v)).flatten()
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        chain.iter().rev().copied().find(|ip| !self.trusts(*ip)).or_else(|| chain.first().copied())
    }
}

/// An address as proxies write it: `203.0.113.7`, `2001:db8::1`, `"[2001:db8::1]:4711"`,
/// `198.51.100.1:8080`.
fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    s.rsplit_once(':').and_then(|(host, _port)| host.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(key: &str, value: &str) -> HttpHeader {
        HttpHeader { key: key.into(), value: value.into() }
    }

    fn proxies() -> TrustedProxies {
        TrustedProxies::new(vec!["10.0.0.0/24".parse().unwrap()])
    }

    #[test]
    fn the_client_comes_from_a_trusted_proxy_only() {
        let (proxy, stranger) = ("10.0.0.2".parse().unwrap(), "192.0.2.9".parse().unwrap());
        let xff = [h("X-Forwarded-For", "203.0.113.7, 10.0.0.3")];
        // The last address that is not a proxy of ours: the client the first proxy saw.
        assert_eq!(proxies().client(proxy, &xff), "203.0.113.7".parse().ok());
        assert_eq!(proxies().client(stranger, &xff), None, "anyone can write a header");
        assert_eq!(TrustedProxies::default().client(proxy, &xff), None, "nothing trusted");
        let spoofed = [h("x-forwarded-for", "1.2.3.4, 198.51.100.5")];
        assert_eq!(proxies().client(proxy, &spoofed), "198.51.100.5".parse().ok());
        let direct = [h("CF-Connecting-IP", "2001:db8::1"), h("x-forwarded-for", "1.1.1.1")];
        assert_eq!(proxies().client(proxy, &direct), "2001:db8::1".parse().ok());
        let fwd = [h("Forwarded", "for=192.0.2.60;proto=http, for=\"[2001:db8::7]:4711\"")];
        assert_eq!(proxies().client(proxy, &fwd), "2001:db8::7".parse().ok());
        assert_eq!(proxies().client(proxy, &[h("x-forwarded-for", "garbage")]), None);
    }
}
