//! hopwatch's `proto/` against Cilium's published Hubble API: every message, field, number,
//! type and enum value hopwatch shares with Hubble must be Hubble's, and every Hubble filter or
//! request field hopwatch leaves out must be one this test lists with the reason. The facts are
//! transcribed in `cilium_api.tsv` beside this file (see its header for the version).

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{FieldDescriptor, Kind};

use crate::descriptors;

/// Hubble fields of the messages that decide what a query selects, which hopwatch's `proto/`
/// does not declare (a Hubble client sending them is not narrowed by them; `observe` refuses the
/// flags that set them).
const NOT_MODELLED: &[(&str, &str, &str)] = &[
    ("flow.FlowFilter", "source_ip_xlated", "Cilium SNAT (--snat-ip)"),
    ("flow.FlowFilter", "source_cluster_name", "Cilium cluster mesh (--from-cluster)"),
    ("flow.FlowFilter", "destination_cluster_name", "Cilium cluster mesh (--to-cluster)"),
    ("flow.FlowFilter", "ip_trace_id", "Cilium datapath IP option (--ip-trace-id)"),
    ("flow.FlowFilter", "encrypted", "Cilium WireGuard/IPsec (--encrypted)"),
    ("observer.GetFlowsRequest", "experimental", "holds no field any more (reserved 1)"),
    ("observer.GetFlowsRequest", "extensions", "google.protobuf.Any for other APIs"),
];

/// Messages whose every Hubble field must be declared or listed in [`NOT_MODELLED`].
const COMPLETE: &[&str] =
    &["flow.FlowFilter", "flow.FlowFilter.Experimental", "observer.GetFlowsRequest"];

struct Fact {
    name: String,
    number: u32,
    ty: String,
}

/// Message name → its fields.
type Fields = BTreeMap<String, Vec<Fact>>;
/// Enum name → value name → number.
type Enums = BTreeMap<String, BTreeMap<String, i32>>;
/// `service.Method` → `request -> [stream ]response`.
type Rpcs = BTreeMap<String, String>;

fn facts() -> (Fields, Enums, Rpcs) {
    let text = include_str!("cilium_api.tsv");
    let (mut fields, mut enums, mut rpcs) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 5, "{line}");
        match cols[0] {
            "field" => fields.entry(cols[1].to_owned()).or_insert_with(Vec::new).push(Fact {
                name: cols[2].to_owned(),
                number: cols[3].parse().expect(line),
                ty: cols[4].to_owned(),
            }),
            "enum" => {
                enums
                    .entry(cols[1].to_owned())
                    .or_insert_with(BTreeMap::new)
                    .insert(cols[2].to_owned(), cols[3].parse().expect(line));
            }
            "rpc" => {
                rpcs.insert(format!("{}.{}", cols[1], cols[2]), cols[4].to_owned());
            }
            other => panic!("unknown kind {other}: {line}"),
        }
    }
    (fields, enums, rpcs)
}

/// The field's type as a .proto file declares it, relative names reduced to the last part.
fn declared(f: &FieldDescriptor) -> String {
    let base = match f.kind() {
        Kind::Message(m) => m.name().to_owned(),
        Kind::Enum(e) => e.name().to_owned(),
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes".into(),
    };
    if f.is_list() { format!("repeated {base}") } else { base }
}

/// `repeated flow.FlowFilter` → `repeated FlowFilter`.
fn short(ty: &str) -> String {
    let (label, t) = ty.split_once(' ').map_or(("", ty), |(l, t)| (l, t));
    let t = t.rsplit('.').next().unwrap_or(t);
    if label.is_empty() { t.to_owned() } else { format!("{label} {t}") }
}

#[test]
fn shared_messages_fields_and_enums_are_hubble_s() {
    let (fields, enums, rpcs) = facts();
    let pool = descriptors();
    let mut checked = 0;
    let mut left_out = BTreeSet::new();
    for (message, facts) in &fields {
        let Some(ours) = pool.get_message_by_name(message) else {
            assert!(!COMPLETE.contains(&message.as_str()), "{message} is missing");
            continue;
        };
        for fact in facts {
            if let Some(f) = ours.get_field(fact.number) {
                assert_eq!(f.name(), fact.name, "{message} field {}", fact.number);
                assert_eq!(declared(&f), short(&fact.ty), "{message}.{}", fact.name);
                checked += 1;
                continue;
            }
            assert!(
                ours.get_field_by_name(&fact.name).is_none(),
                "{message}.{} has another number than Hubble's {}",
                fact.name,
                fact.number
            );
            left_out.insert(format!("{message}.{}", fact.name));
            if COMPLETE.contains(&message.as_str()) {
                assert!(
                    NOT_MODELLED.iter().any(|(m, f, _)| m == message && *f == fact.name),
                    "Hubble's {message}.{} = {} is neither in proto/ nor listed as not modelled",
                    fact.name,
                    fact.number
                );
            }
        }
        // No Hubble-range number of ours that Hubble does not have.
        for f in ours.fields() {
            let known = facts.iter().any(|x| x.number == f.number());
            assert!(
                known || f.number() >= 1000,
                "{message}.{} = {} is not Hubble's and below 1000",
                f.name(),
                f.number()
            );
        }
    }
    for (name, values) in &enums {
        let Some(ours) = pool.get_enum_by_name(name) else { continue };
        for v in ours.values() {
            assert_eq!(
                values.get(v.name()),
                Some(&v.number()),
                "{name}.{} = {} is not Hubble's",
                v.name(),
                v.number()
            );
        }
        for (value, number) in values {
            assert_eq!(
                ours.get_value_by_name(value).map(|v| v.number()),
                Some(*number),
                "Hubble's {name}.{value} = {number} is missing"
            );
        }
    }
    assert!(checked > 150, "only {checked} fields compared");
    // Every RPC hopwatch's Observer serves is Hubble's, with Hubble's request and response.
    let observer = pool.get_service_by_name("observer.Observer").expect("proto/ has the Observer");
    for m in observer.methods() {
        let key = format!("observer.Observer.{}", m.name());
        let stream = if m.is_server_streaming() { "stream " } else { "" };
        let ours = format!("{} -> {stream}{}", m.input().full_name(), m.output().full_name());
        assert_eq!(rpcs.get(&key), Some(&ours), "{key} is not Hubble's");
    }
    // Cilium-only fields hopwatch leaves out stay left out on purpose: the filter and request
    // ones are listed above; the rest of Flow's (ethernet, policy verdicts, ...) are data
    // hopwatch does not produce.
    for (m, f, _) in NOT_MODELLED {
        assert!(left_out.contains(&format!("{m}.{f}")), "{m}.{f} is declared now: unlist it");
    }
}
