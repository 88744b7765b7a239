//! hopwatch's `proto/` against Cilium Hubble's published API (`hubble_api.txt`, facts
//! transcribed from Cilium's `api/v1/{flow,observer,relay}/*.proto`): every message, field,
//! enum value and RPC hopwatch shares with Hubble has Hubble's name, number, type, label and
//! oneof, and everything hopwatch adds is out of Hubble's way (fields numbered 1000 and up,
//! types with names Hubble does not use). The `hubble` CLI and Hubble's client libraries decode
//! the collector's answers by these numbers and types.
#![allow(
    unused_crate_dependencies,
    reason = "a test target links every dependency of the package; the lint is for the library"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use prost_reflect::{Cardinality, DescriptorPool, FieldDescriptor, Kind};

/// Types hopwatch adds to Hubble's packages (documented in proto/README.md).
const HOPWATCH_TYPES: &[&str] = &[
    "flow.SocketAddress",
    "flow.Postgres",
    "flow.Redis",
    "flow.MySQL",
    "flow.SocketEvent",
    "flow.TcpStats",
    "flow.Process",
];
/// Hubble's packages, as hopwatch's `proto/` has them.
const PACKAGES: &[&str] = &["flow", "observer", "relay"];
/// hopwatch's own fields in Hubble's messages start here.
const FIRST_OWN_FIELD: u32 = 1000;

/// A field as Hubble defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    name: String,
    number: u32,
    ty: String,
    repeated: bool,
    oneof: Option<String>,
}

#[derive(Debug, Default)]
struct Hubble {
    /// message → number → field.
    fields: BTreeMap<String, BTreeMap<u32, Field>>,
    /// enum → number → value name.
    values: BTreeMap<String, BTreeMap<i32, String>>,
    /// service → method → (request, response, server streaming).
    rpcs: BTreeMap<String, BTreeMap<String, (String, String, bool)>>,
    /// Every type name Hubble defines in these packages.
    types: BTreeSet<String>,
}

fn hubble() -> Hubble {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/hubble_api.txt");
    let text = std::fs::read_to_string(&path).expect("hubble_api.txt");
    let mut h = Hubble::default();
    for (i, line) in text.lines().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = || format!("hubble_api.txt:{}: {line:?}", i + 1);
        let num = |s: &str| s.parse::<i64>().unwrap_or_else(|_| panic!("{}: not a number", at()));
        match words.as_slice() {
            [] => {}
            [w, ..] if w.starts_with('#') => {}
            ["field", msg, name, number, ty, rest @ ..] => {
                let field = Field {
                    name: (*name).to_owned(),
                    number: u32::try_from(num(number)).unwrap_or_else(|_| panic!("{}", at())),
                    ty: (*ty).to_owned(),
                    repeated: rest.contains(&"repeated"),
                    oneof: rest.iter().find_map(|w| w.strip_prefix("oneof=")).map(str::to_owned),
                };
                h.types.insert((*msg).to_owned());
                let old =
                    h.fields.entry((*msg).to_owned()).or_default().insert(field.number, field);
                assert!(old.is_none(), "{}: number listed twice", at());
            }
            ["value", en, name, number] => {
                h.types.insert((*en).to_owned());
                h.values.entry((*en).to_owned()).or_default().insert(
                    i32::try_from(num(number)).unwrap_or_else(|_| panic!("{}", at())),
                    (*name).to_owned(),
                );
            }
            ["rpc", service, method, request, response, rest @ ..] => {
                h.rpcs.entry((*service).to_owned()).or_default().insert(
                    (*method).to_owned(),
                    ((*request).to_owned(), (*response).to_owned(), rest == ["stream"]),
                );
            }
            ["type", name] => {
                h.types.insert((*name).to_owned());
            }
            _ => panic!("{}: cannot read it", at()),
        }
    }
    h
}

/// hopwatch's `proto/`, compiled as hopwatch-proto's build script compiles it.
fn ours() -> DescriptorPool {
    let proto =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").join("proto");
    let fds = protox::compile(
        ["flow/flow.proto", "relay/relay.proto", "observer/observer.proto"],
        [&proto],
    )
    .expect("proto/ compiles");
    DescriptorPool::from_file_descriptor_set(fds).expect("a valid descriptor set")
}

fn type_name(f: &FieldDescriptor) -> String {
    match f.kind() {
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
        k => format!("{k:?}").to_lowercase(),
    }
}

fn describe(f: &FieldDescriptor) -> Field {
    Field {
        name: f.name().to_owned(),
        number: f.number(),
        ty: type_name(f),
        repeated: f.cardinality() == Cardinality::Repeated,
        oneof: f.containing_oneof().map(|o| o.name().to_owned()),
    }
}

#[test]
fn hubbles_messages_fields_enums_and_rpcs_are_hubbles() {
    let h = hubble();
    let pool = ours();
    let mut wrong = Vec::new();
    let mut checked = 0usize;
    let ours_in_hubbles_packages =
        |name: &str| PACKAGES.iter().any(|p| name.starts_with(&format!("{p}.")));

    for m in pool.all_messages().filter(|m| ours_in_hubbles_packages(m.full_name())) {
        let name = m.full_name();
        if HOPWATCH_TYPES.contains(&name) {
            if h.types.contains(name) {
                wrong.push(format!("{name}: hopwatch's own type takes a name Hubble uses"));
            }
            continue;
        }
        if !h.types.contains(name) {
            wrong.push(format!("{name}: not a Hubble message (add it to hubble_api.txt from Cilium's proto, or to HOPWATCH_TYPES)"));
            continue;
        }
        let theirs = h.fields.get(name).cloned().unwrap_or_default();
        for f in m.fields() {
            let mine = describe(&f);
            match theirs.get(&mine.number) {
                Some(t) if *t == mine => checked += 1,
                Some(t) => wrong.push(format!("{name}: ours {mine:?}, Hubble's {t:?}")),
                None if mine.number >= FIRST_OWN_FIELD
                    && theirs.values().all(|t| t.name != mine.name) =>
                {
                    checked += 1;
                }
                None => wrong.push(format!(
                    "{name}.{}: number {} is neither Hubble's nor hopwatch's (>= {FIRST_OWN_FIELD}), or the name is Hubble's",
                    mine.name, mine.number
                )),
            }
        }
    }

    for e in pool.all_enums().filter(|e| ours_in_hubbles_packages(e.full_name())) {
        let name = e.full_name();
        if HOPWATCH_TYPES.contains(&name) {
            if h.types.contains(name) {
                wrong.push(format!("{name}: hopwatch's own enum takes a name Hubble uses"));
            }
            continue;
        }
        let Some(theirs) = h.values.get(name) else {
            wrong.push(format!("{name}: not a Hubble enum"));
            continue;
        };
        for v in e.values() {
            match theirs.get(&v.number()) {
                Some(t) if t == v.name() => checked += 1,
                other => wrong.push(format!(
                    "{name}.{} = {}: Hubble's is {other:?}",
                    v.name(),
                    v.number()
                )),
            }
        }
    }

    for s in pool.services().filter(|s| ours_in_hubbles_packages(s.full_name())) {
        let name = s.full_name();
        let Some(theirs) = h.rpcs.get(name) else {
            wrong.push(format!("service {name}: not Hubble's"));
            continue;
        };
        for m in s.methods() {
            let mine = (
                m.input().full_name().to_owned(),
                m.output().full_name().to_owned(),
                m.is_server_streaming(),
            );
            match theirs.get(m.name()) {
                Some(t) if *t == mine && !m.is_client_streaming() => checked += 1,
                other => wrong
                    .push(format!("rpc {name}.{}: ours {mine:?}, Hubble's {other:?}", m.name())),
            }
        }
    }

    assert!(wrong.is_empty(), "proto/ differs from Hubble's published API:\n{}", wrong.join("\n"));
    eprintln!("{checked} fields, enum values and RPCs checked against Hubble's published API");
    assert!(checked > 200, "only {checked} checked: is hubble_api.txt read?");
}

/// The table itself is consistent: every type a field names is a Hubble type, a well-known
/// type, or (for the shared messages) one hopwatch defines the same.
#[test]
fn the_table_names_only_types_it_knows() {
    let h = hubble();
    let scalars = ["string", "bool", "uint32", "uint64", "int32", "int64", "bytes"];
    for (msg, fields) in &h.fields {
        for f in fields.values() {
            assert!(
                scalars.contains(&f.ty.as_str())
                    || f.ty.starts_with("google.protobuf.")
                    || h.types.contains(&f.ty),
                "{msg}.{}: type {} is not in hubble_api.txt",
                f.name,
                f.ty
            );
        }
    }
}
