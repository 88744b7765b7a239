//! The static endpoints file: names for addresses nothing else names (hosts without Kubernetes,
//! databases outside the cluster, a load balancer's virtual address).
//!
//! ```yaml
//! endpoints:
//!   - name: billing-db            # required
//!     namespace: legacy           # optional
//!     labels: {role: primary}     # optional, shown as `role=primary`
//!     ips: [10.20.0.5, 10.20.1.0/24, "fd00:20::/64"]
//!   - name: api
//!     namespace: shop
//!     kind: service               # the addresses are a service's virtual IPs: flows dialling
//!     ips: [10.20.9.1]            # them get `destination_service`
//! ```
//!
//! YAML or JSON (JSON is read as the YAML it also is). The most specific prefix wins. A bad file is
//! refused whole with the line, column and field of the first problem.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
};

use hopwatch_proto::flow::{Endpoint, Service};
use ipnet::IpNet;
use serde::Deserialize;
use serde_saphyr::Spanned;

#[derive(Debug, thiserror::Error)]
pub enum StaticError {
    #[error("cannot read the endpoints file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("endpoints file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("endpoints file {path}: line {line}, column {column}: field `{field}`: {message}")]
    Invalid { path: PathBuf, line: u64, column: u64, field: String, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    endpoints: Vec<RawEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    name: Spanned<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    ips: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    kind: Option<Spanned<String>>,
}

/// One entry of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StaticEndpoint {
    pub name: String,
    pub namespace: String,
    /// `key=value`.
    pub labels: Vec<String>,
    pub service: bool,
}

/// The file's entries, indexed by prefix.
#[derive(Debug, Default)]
pub(crate) struct StaticEndpoints {
    entries: Vec<StaticEndpoint>,
    /// Per family: prefix length (longest first) → network address → entry index.
    v4: Vec<(u8, HashMap<IpAddr, usize>)>,
    v6: Vec<(u8, HashMap<IpAddr, usize>)>,
}

impl StaticEndpoints {
    pub(crate) fn load(path: &Path) -> Result<Self, StaticError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| StaticError::Read { path: path.to_owned(), source })?;
        Self::parse(path, &text)
    }

    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self, StaticError> {
        let raw: RawFile = serde_saphyr::from_str(text).map_err(|e| StaticError::Syntax {
            path: path.to_owned(),
            message: syntax_message(&e),
        })?;
        let invalid =
            |at: &serde_saphyr::Location, field: String, message: String| StaticError::Invalid {
                path: path.to_owned(),
                line: at.line(),
                column: at.column(),
                field,
                message,
            };
        let mut out = Self::default();
        let mut seen: HashMap<IpNet, usize> = HashMap::new();
        for (i, ep) in raw.endpoints.into_iter().enumerate() {
            let name = ep.name.value.trim();
            if name.is_empty() {
                return Err(invalid(
                    &ep.name.referenced,
                    format!("endpoints[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            let service = match ep.kind.as_ref().map(|k| k.value.as_str()) {
                None | Some("endpoint") => false,
                Some("service") => true,
                Some(other) => {
                    let k = ep.kind.as_ref().expect("matched Some");
                    return Err(invalid(
                        &k.referenced,
                        format!("endpoints[{i}].kind"),
                        format!("`{other}` is neither `endpoint` nor `service`"),
                    ));
                }
            };
            if ep.ips.value.is_empty() {
                return Err(invalid(
                    &ep.ips.referenced,
                    format!("endpoints[{i}].ips"),
                    "lists no address".into(),
                ));
            }
            let index = out.entries.len();
            for (j, ip) in ep.ips.value.iter().enumerate() {
                let field = format!("endpoints[{i}].ips[{j}]");
                let net = parse_net(ip.value.trim()).ok_or_else(|| {
                    invalid(
                        &ip.referenced,
                        field.clone(),
                        format!("`{}` is not an IP address or CIDR prefix", ip.value),
                    )
                })?;
                if let Some(other) = seen.insert(net, i) {
                    return Err(invalid(
                        &ip.referenced,
                        field,
                        format!("{net} is already listed by endpoints[{other}]"),
                    ));
                }
                out.insert(net, index);
            }
            out.entries.push(StaticEndpoint {
                name: name.to_owned(),
                namespace: ep.namespace.unwrap_or_default(),
                labels: ep.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                service,
            });
        }
        Ok(out)
    }

    fn insert(&mut self, net: IpNet, index: usize) {
        let len = net.prefix_len();
        let table = if net.addr().is_ipv6() { &mut self.v6 } else { &mut self.v4 };
        let pos = match table.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(p) => p,
            Err(p) => {
                table.insert(p, (len, HashMap::new()));
                p
            }
        };
        table[pos].1.insert(net.network(), index);
    }

    /// The most specific entry containing `ip`.
    pub(crate) fn lookup(&self, ip: IpAddr) -> Option<&StaticEndpoint> {
        let table = if ip.is_ipv6() { &self.v6 } else { &self.v4 };
        table.iter().find_map(|(len, nets)| {
            let net = IpNet::new(ip, *len).ok()?.trunc();
            nets.get(&net.network()).map(|i| &self.entries[*i])
        })
    }

    /// The endpoint `ip` belongs to (entries of kind `endpoint`).
    pub(crate) fn endpoint(&self, ip: IpAddr) -> Option<Endpoint> {
        let e = self.lookup(ip).filter(|e| !e.service)?;
        Some(Endpoint {
            namespace: e.namespace.clone(),
            pod_name: e.name.clone(),
            labels: e.labels.clone(),
            ..Endpoint::default()
        })
    }

    /// The service whose virtual address is `ip` (entries of kind `service`).
    pub(crate) fn service(&self, ip: IpAddr) -> Option<Service> {
        let e = self.lookup(ip).filter(|e| e.service)?;
        Some(Service { name: e.name.clone(), namespace: e.namespace.clone() })
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        // `10.0.0.7/24` means the /24 it is in.
        return Some(net.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

/// The parser's message on one line, with its location first.
fn syntax_message(e: &serde_saphyr::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first).to_owned();
    match e.location() {
        Some(at) if !first.contains("line") => {
            format!("line {}, column {}: {first}", at.line(), at.column())
        }
        _ => first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<StaticEndpoints, StaticError> {
        StaticEndpoints::parse(Path::new("endpoints.yaml"), text)
    }

    #[test]
    fn the_most_specific_prefix_wins() {
        let s = parse(
            "endpoints:\n  - name: net\n    ips: [10.20.0.0/16]\n  - name: db\n    namespace: legacy\n    labels: {role: primary}\n    ips: [10.20.0.5, \"fd00:20::/64\"]\n  - name: api\n    kind: service\n    ips: [10.20.9.1]\n",
        )
        .unwrap();
        let db = s.endpoint("10.20.0.5".parse().unwrap()).unwrap();
        assert_eq!((db.namespace.as_str(), db.pod_name.as_str()), ("legacy", "db"));
        assert_eq!(db.labels, vec!["role=primary".to_owned()]);
        assert_eq!(s.endpoint("10.20.3.4".parse().unwrap()).unwrap().pod_name, "net");
        assert_eq!(s.endpoint("fd00:20::9".parse().unwrap()).unwrap().pod_name, "db");
        assert!(s.endpoint("10.21.0.1".parse().unwrap()).is_none());
        assert_eq!(s.service("10.20.9.1".parse().unwrap()).unwrap().name, "api");
        assert!(s.endpoint("10.20.9.1".parse().unwrap()).is_none());
    }

    #[test]
    fn json_is_accepted() {
        let s = parse(r#"{"endpoints": [{"name": "db", "ips": ["192.168.7.0/24"]}]}"#).unwrap();
        assert_eq!(s.endpoint("192.168.7.9".parse().unwrap()).unwrap().pod_name, "db");
    }

    #[test]
    fn a_bad_address_is_reported_with_line_and_field() {
        let e = parse("endpoints:\n  - name: db\n    ips:\n      - 10.0.0.1\n      - 10.0.0.300\n")
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("line 5"), "{msg}");
        assert!(msg.contains("endpoints[0].ips[1]"), "{msg}");
        assert!(msg.contains("10.0.0.300"), "{msg}");
    }

    #[test]
    fn other_mistakes_are_reported_with_line_and_field() {
        let cases = [
            (
                "endpoints:\n  - name: db\n    lables: {a: b}\n    ips: [10.0.0.1]\n",
                "line 3",
                "lables",
            ),
            ("endpoints:\n  - name: \"\"\n    ips: [10.0.0.1]\n", "line 2", "endpoints[0].name"),
            ("endpoints:\n  - name: db\n    ips: []\n", "line 3", "endpoints[0].ips"),
            (
                "endpoints:\n  - name: db\n    kind: vip\n    ips: [10.0.0.1]\n",
                "line 3",
                "endpoints[0].kind",
            ),
            (
                "endpoints:\n  - name: a\n    ips: [10.0.0.1]\n  - name: b\n    ips: [10.0.0.1/32]\n",
                "line 5",
                "endpoints[1].ips[0]",
            ),
            ("endpoints:\n  - ips: [10.0.0.1]\n", "line 2", "name"),
        ];
        for (text, line, field) in cases {
            let msg = parse(text).unwrap_err().to_string();
            assert!(msg.contains(line) && msg.contains(field), "{text:?} → {msg}");
        }
    }
}
