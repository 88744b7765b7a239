//! `hopwatch observe`: query a collector's flows, with the flags of `hubble observe`.

mod cilium_only;
pub(super) mod filters;
mod input;

pub(super) mod time;

use std::{fmt::Write as _, io::Write as _, path::PathBuf, process::ExitCode, time::Duration};

use clap::ArgMatches;
use hopwatch_collector::filter::FilterSet;
use hopwatch_proto::{
    FieldMask,
    flow::FlowFilter,
    observer::{GetFlowsRequest, observer_client::ObserverClient},
    tls::{ClientFlags, ClientTls, Target, TlsError, explain},
};

use self::{cilium_only::CiliumOnly, filters::FlagError};
use crate::print::{Color, Format, Options, Printer, time::TimeFormat};

/// How to reach the collector: the TLS and connection flags `hopwatch observe` and `hopwatch
/// hops --server` share.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct Connection {
    /// Use TLS to the server (implied by https://).
    #[arg(long)]
    pub tls: bool,
    /// CA certificate(s) that signed the server's certificate (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_ca_cert_files: Option<PathBuf>,
    /// Client certificate for mutual TLS (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_client_cert_file: Option<PathBuf>,
    /// Client private key for mutual TLS (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_client_key_file: Option<PathBuf>,
    /// Name expected in the server's certificate [default: the server's host].
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Allow plaintext to a server that is not on loopback.
    #[arg(long)]
    pub allow_plaintext: bool,
    /// Give up connecting after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Why a command could not use the collector.
#[derive(Debug, thiserror::Error)]
pub(super) enum ServerError {
    /// `--server` is not an address (the source names it and says why).
    #[error("--server: {source}")]
    Address {
        server: String,
        #[source]
        source: TlsError,
    },
    /// Certificate files, or plaintext to a host that is not loopback (the source names the
    /// flag to fix).
    #[error(transparent)]
    Tls(TlsError),
    #[error("cannot connect to {uri}: {}", explain(source))]
    Connect {
        uri: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The server refused the request as invalid (`InvalidArgument`): the flags are at fault.
    #[error("{uri} rejected the request: {}", source.message())]
    Rejected {
        uri: String,
        #[source]
        source: tonic::Status,
    },
    /// The call failed for any other reason (unavailable, internal, TLS handshake, ...).
    #[error("{uri}: {}", explain(source))]
    Failed {
        uri: String,
        #[source]
        source: tonic::Status,
    },
}

impl ServerError {
    /// Whether the user's flags are at fault (exit status 2) rather than the server (1).
    pub(super) fn is_usage(&self) -> bool {
        matches!(self, Self::Address { .. } | Self::Tls(_) | Self::Rejected { .. })
    }

    /// A failed call: the server's verdict on the request, or its failure.
    pub(super) fn status(uri: &str, source: tonic::Status) -> Self {
        let uri = uri.to_owned();
        if source.code() == tonic::Code::InvalidArgument {
            Self::Rejected { uri, source }
        } else {
            Self::Failed { uri, source }
        }
    }
}

impl Connection {
    /// The collector at `server` (host:port or a URL) as these flags reach it. An error is the
    /// user's to fix (a bad address, certificate files, plaintext off loopback).
    pub(super) fn endpoint(
        &self,
        server: &str,
    ) -> Result<(Target, tonic::transport::Endpoint), ServerError> {
        let tls = ClientTls {
            ca: self.tls_ca_cert_files.clone(),
            cert: self.tls_client_cert_file.clone(),
            key: self.tls_client_key_file.clone(),
            server_name: self.tls_server_name.clone(),
            flags: ClientFlags {
                ca: "--tls-ca-cert-files",
                cert: "--tls-client-cert-file",
                key: "--tls-client-key-file",
            },
        };
        let target = Target::parse(server, self.tls)
            .map_err(|source| ServerError::Address { server: server.to_owned(), source })?;
        let endpoint = target
            .endpoint(&tls, self.allow_plaintext)
            .map_err(ServerError::Tls)?
            .connect_timeout(self.timeout);
        Ok((target, endpoint))
    }

    /// An Observer client connected to the collector at `server`, and its URI.
    pub(super) async fn client(
        &self,
        server: &str,
    ) -> Result<(String, ObserverClient<tonic::transport::Channel>), ServerError> {
        let (target, endpoint) = self.endpoint(server)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ServerError::Connect { uri: target.uri.clone(), source })?;
        Ok((target.uri, ObserverClient::new(channel).max_decoding_message_size(32 << 20)))
    }
}

/// Flows printed by a plain `hopwatch observe` (as `hubble observe`).
const DEFAULT_LAST: u64 = 20;

/// A clap value parser that keeps the flag's text (filters are built from the raw values, in
/// command-line order) once `check` accepts it.
fn validated<T, E>(check: fn(&str) -> Result<T, E>) -> impl Fn(&str) -> Result<String, E> + Clone {
    move |s| check(s).map(|_| s.to_owned())
}

/// A clap value parser for a flag that sets one `FlowFilter` field: the value is accepted when
/// the collector's filters would accept it.
fn check_with(
    f: impl Fn(&mut hopwatch_proto::flow::FlowFilter, String),
) -> impl Fn(&str) -> Result<String, FlagError> + Clone {
    let f = std::sync::Arc::new(f);
    move |s: &str| {
        let mut ff = hopwatch_proto::flow::FlowFilter::default();
        f(&mut ff, s.to_owned());
        FilterSet::new(&[ff], &[])
            .map(|_| s.to_owned())
            .map_err(|source| FlagError::Filter { source })
    }
}

macro_rules! field_check {
    ($field:ident) => {
        check_with(|f, v| f.$field.push(v))
    };
}

#[derive(Debug, Clone, clap::Args)]
#[expect(clippy::struct_excessive_bools, reason = "independent command-line switches")]
#[command(
    after_help = "Filters: --X (ip, pod, namespace, label, service, port, fqdn) matches either \
    side; --from-X/--to-X one side. Repeating a flag ORs its values; different flags AND. \
    --not puts the next filter in the blacklist."
)]
pub(super) struct ObserveArgs {
    /// Collector address: host:port, http://host:port or https://host:port.
    #[arg(long, env = "HOPWATCH_SERVER", default_value = "localhost:4245")]
    pub server: String,
    #[command(flatten)]
    pub connection: Connection,

    /// The last N flows [default: 20 unless --follow, --since or --until is given].
    #[arg(long, value_name = "N", conflicts_with_all = ["first", "all"])]
    pub last: Option<u64>,
    /// The first N flows.
    #[arg(long, value_name = "N", conflicts_with_all = ["follow", "all"])]
    pub first: Option<u64>,
    /// Every stored flow.
    #[arg(long)]
    pub all: bool,
    /// Keep printing flows as they arrive.
    #[arg(short, long)]
    pub follow: bool,
    /// Flows since this time: a duration ago (5m, 1h30m) or RFC 3339.
    #[arg(long, value_parser = time::parse_when)]
    pub since: Option<prost_types::Timestamp>,
    /// Flows until this time: a duration ago (5m) or RFC 3339.
    #[arg(long, value_parser = time::parse_when)]
    pub until: Option<prost_types::Timestamp>,

    /// Flows from or to this Kubernetes namespace.
    #[arg(short, long, value_name = "NS")]
    pub namespace: Vec<String>,
    #[arg(long, value_name = "NS")]
    pub from_namespace: Vec<String>,
    #[arg(long, value_name = "NS")]
    pub to_namespace: Vec<String>,
    /// Flows from or to pods with this name prefix ([namespace/]name; namespace "default" if
    /// omitted).
    #[arg(long, value_parser = field_check!(source_pod))]
    pub pod: Vec<String>,
    #[arg(long, value_parser = field_check!(source_pod))]
    pub from_pod: Vec<String>,
    #[arg(long, value_parser = field_check!(destination_pod))]
    pub to_pod: Vec<String>,
    /// Flows from or to this address or CIDR.
    #[arg(long, value_parser = field_check!(source_ip))]
    pub ip: Vec<String>,
    #[arg(long, value_parser = field_check!(source_ip))]
    pub from_ip: Vec<String>,
    #[arg(long, value_parser = field_check!(destination_ip))]
    pub to_ip: Vec<String>,
    /// Flows from or to endpoints matching this label selector (app=web,tier!=db).
    #[arg(short, long, value_parser = field_check!(source_label))]
    pub label: Vec<String>,
    #[arg(long, value_parser = field_check!(source_label))]
    pub from_label: Vec<String>,
    #[arg(long, value_parser = field_check!(destination_label))]
    pub to_label: Vec<String>,
    /// Flows from or to this service ([namespace/]name).
    #[arg(long, value_parser = field_check!(source_service))]
    pub service: Vec<String>,
    #[arg(long, value_parser = field_check!(source_service))]
    pub from_service: Vec<String>,
    #[arg(long, value_parser = field_check!(destination_service))]
    pub to_service: Vec<String>,
    /// Flows from or to this L4 port.
    #[arg(long, value_parser = field_check!(source_port))]
    pub port: Vec<String>,
    #[arg(long, value_parser = field_check!(source_port))]
    pub from_port: Vec<String>,
    #[arg(long, value_parser = field_check!(destination_port))]
    pub to_port: Vec<String>,
    /// Flows from or to this DNS name ("*" within one label).
    #[arg(long, value_parser = field_check!(source_fqdn))]
    pub fqdn: Vec<String>,
    #[arg(long, value_parser = field_check!(source_fqdn))]
    pub from_fqdn: Vec<String>,
    #[arg(long, value_parser = field_check!(destination_fqdn))]
    pub to_fqdn: Vec<String>,
    /// L4 or L7 protocol: tcp, udp, icmp, http, dns, postgres, redis, mysql, ...
    #[arg(long, value_parser = field_check!(protocol))]
    pub protocol: Vec<String>,
    /// FORWARDED, DROPPED, ERROR, ...
    #[arg(long, value_parser = validated(filters::parse_verdict))]
    pub verdict: Vec<String>,
    /// Event type: drop, trace, l7, sock, ... (optionally type:subtype).
    #[arg(short = 't', long = "type", value_parser = validated(filters::parse_type))]
    pub r#type: Vec<String>,
    /// HTTP status code or prefix (404, 5+).
    #[arg(long, value_parser = field_check!(http_status_code))]
    pub http_status: Vec<String>,
    /// HTTP method (GET, POST, ...).
    #[arg(long)]
    pub http_method: Vec<String>,
    /// Regular expression over the HTTP path.
    #[arg(long, value_parser = field_check!(http_path))]
    pub http_path: Vec<String>,
    /// Regular expression over the DNS query name.
    #[arg(long, value_parser = field_check!(dns_query))]
    pub dns_query: Vec<String>,
    /// Node name pattern ("node-*").
    #[arg(long, value_parser = field_check!(node_name))]
    pub node_name: Vec<String>,
    /// ingress or egress.
    #[arg(long, value_parser = validated(filters::parse_direction))]
    pub traffic_direction: Vec<String>,
    /// Flow id.
    #[arg(long)]
    pub uuid: Vec<String>,
    /// v4 or v6.
    #[arg(long, value_parser = validated(filters::parse_ip_version))]
    pub ip_version: Vec<String>,
    /// Application protocol of L7 flows: http, dns, postgres, redis, mysql, tls (hopwatch).
    #[arg(long, value_parser = field_check!(l7_protocol))]
    pub l7_protocol: Vec<String>,
    /// Only flows that took at least this long (L7 request to response, TCP connect), e.g.
    /// 50ms (hopwatch).
    #[arg(long, value_parser = validated(time::parse_latency))]
    pub min_latency: Vec<String>,
    /// Flows from or to a pod in any Kubernetes namespace.
    #[arg(short = 'A', long, num_args = 0, default_missing_value = "true", action = clap::ArgAction::Append)]
    pub all_namespaces: Vec<String>,
    /// Flows from a pod in any Kubernetes namespace.
    #[arg(long, num_args = 0, default_missing_value = "true", action = clap::ArgAction::Append)]
    pub from_all_namespaces: Vec<String>,
    /// Flows to a pod in any Kubernetes namespace.
    #[arg(long, num_args = 0, default_missing_value = "true", action = clap::ArgAction::Append)]
    pub to_all_namespaces: Vec<String>,
    /// Flows from or to endpoints owned by this workload ([kind/]name: Deployment/api, api).
    #[arg(long, value_name = "WORKLOAD")]
    pub workload: Vec<String>,
    #[arg(long, value_name = "WORKLOAD")]
    pub from_workload: Vec<String>,
    #[arg(long, value_name = "WORKLOAD")]
    pub to_workload: Vec<String>,
    /// Dropped packets by kernel drop reason (NETFILTER_DROP, NO_SOCKET, ...; hopwatch's drops
    /// carry the kernel's `enum skb_drop_reason` names, not Cilium's).
    #[arg(long, value_name = "REASON", value_parser = field_check!(kernel_drop_reason))]
    pub drop_reason_desc: Vec<String>,
    /// TLS server name (SNI) of the connection's handshake: api.example.com, or *.example.com
    /// for its subdomains (hopwatch; flows carrying tls_handshake).
    #[arg(long, value_name = "NAME", value_parser = field_check!(sni))]
    pub sni: Vec<String>,
    /// The client behind a trusted proxy (address or CIDR), as the agent read it from the
    /// proxy's forwarding headers (hopwatch; the agent's --trusted-proxies).
    #[arg(long, value_name = "IP", value_parser = field_check!(client_ip))]
    pub client_ip: Vec<String>,
    /// Regular expression over the whole HTTP URL (http://host/path?query).
    #[arg(long, value_parser = field_check!(http_url))]
    pub http_url: Vec<String>,
    /// HTTP header NAME:VALUE (hopwatch keeps x-request-id, x-correlation-id, traceparent).
    #[arg(long, value_name = "NAME:VALUE", value_parser = validated(filters::parse_http_header))]
    pub http_header: Vec<String>,
    /// TCP flags a flow has, comma-separated (syn,ack).
    #[arg(long, value_name = "FLAGS", value_parser = validated(filters::parse_tcp_flags))]
    pub tcp_flags: Vec<String>,
    /// Only IPv4 flows.
    #[arg(short = '4', long, num_args = 0, default_missing_value = "true", action = clap::ArgAction::Append)]
    pub ipv4: Vec<String>,
    /// Only IPv6 flows.
    #[arg(short = '6', long, num_args = 0, default_missing_value = "true", action = clap::ArgAction::Append)]
    pub ipv6: Vec<String>,
    /// W3C trace id (the HTTP traceparent header's).
    #[arg(long)]
    pub trace_id: Vec<String>,
    /// Flows observed on nodes whose labels match this selector (key=value).
    #[arg(long, value_parser = field_check!(node_labels))]
    pub node_label: Vec<String>,
    /// Network interface the flow was observed on: a name, or an index (hopwatch's drops carry
    /// the index only).
    #[arg(long, value_name = "NAME|INDEX")]
    pub interface: Vec<String>,
    /// A boolean CEL expression over `_flow` (the supported subset is in the README).
    #[arg(long, value_name = "EXPR", value_parser = check_with(|f, v| f.experimental.get_or_insert_default().cel_expression.push(v)))]
    pub cel_expression: Vec<String>,
    /// Put the next filter flag in the blacklist (e.g. --not --verdict FORWARDED).
    #[arg(long, action = clap::ArgAction::Count)]
    pub not: u8,
    /// Allowlist filter as Hubble's JSON FlowFilter (`{"source_pod":["shop/"]}`).
    #[arg(long, value_name = "JSON")]
    pub allowlist: Vec<String>,
    /// Denylist filter as Hubble's JSON FlowFilter.
    #[arg(long, value_name = "JSON")]
    pub denylist: Vec<String>,

    /// Read flows from this file of JSON lines (`-`: standard input) instead of a collector:
    /// `hopwatch agent -o json`, `observe -o json|jsonpb`, `hubble observe -o json`.
    #[arg(long, value_name = "FILE")]
    pub input_file: Option<PathBuf>,
    /// Print the allowlist/denylist the flags make and exit.
    #[arg(long)]
    pub print_raw_filters: bool,
    /// Only these flow fields (comma-separated protobuf names, e.g. time,source.pod_name);
    /// -o json or jsonpb only.
    #[arg(long, value_name = "FIELDS", value_delimiter = ',')]
    pub field_mask: Vec<String>,
    /// Ask only for the fields compact, dict and table print.
    #[arg(long, num_args = 0..=1, default_value = "true", default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub use_default_field_masks: bool,
    /// Print IP addresses, not pod names.
    #[arg(long)]
    pub numeric: bool,
    /// Nothing on standard error but a fatal error (no node notices, no skipped-line warnings).
    #[arg(short, long)]
    pub silent_errors: bool,
    #[command(flatten)]
    pub cilium_only: CiliumOnly,

    /// Output format.
    #[arg(short, long, default_value = "compact", value_parser = query_format)]
    pub output: Format,
    /// Print the node each flow was observed on.
    #[arg(long)]
    pub print_node_name: bool,
    /// Timestamp layout (UTC).
    #[arg(long, value_enum, default_value_t = TimeFormat::StampMilli)]
    pub time_format: TimeFormat,
    /// Colorize compact, dict and table output.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
}

#[derive(Debug, thiserror::Error)]
enum ObserveError {
    #[error(transparent)]
    Flag(#[from] FlagError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("cannot write to standard output: {0}")]
    Stdout(#[source] std::io::Error),
    #[error("cannot read {name}: {source}")]
    Input {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `hopwatch observe`; exit 2 for bad flags, 1 when the server cannot be used.
pub(super) async fn run(args: ObserveArgs, matches: &ArgMatches) -> ExitCode {
    match observe(args, matches).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hopwatch observe: error: {e}");
            let usage = match &e {
                ObserveError::Flag(_) => true,
                ObserveError::Server(s) => s.is_usage(),
                ObserveError::Stdout(_) | ObserveError::Input { .. } => false,
            };
            if usage { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

/// Flow fields the compact, dict and table printers read (what `--use-default-field-masks`
/// asks for): Hubble's default mask less the Cilium-only fields, plus hopwatch's own fields the
/// summaries are made from.
const DEFAULT_FIELD_MASK: &[&str] = &[
    "time",
    "verdict",
    "IP",
    "l4",
    "source.namespace",
    "source.pod_name",
    "destination.namespace",
    "destination.pod_name",
    "Type",
    "node_name",
    "l7",
    "event_type",
    "source_service",
    "destination_service",
    "is_reply",
    "Summary",
    "traffic_direction",
    "socket_event",
    "tcp_stats",
    "tls_handshake",
    "kernel_drop_reason",
    "kernel_drop_location",
    "drop_reason_desc",
    "source_process",
    "destination_process",
];

/// Filters from `--allowlist`/`--denylist` values.
fn raw_filters(flag: &'static str, values: &[String]) -> Result<Vec<FlowFilter>, FlagError> {
    let mut out = Vec::new();
    for v in values {
        let parsed = hopwatch_proto::flow_filters_from_json(v)
            .map_err(|source| FlagError::RawFilter { flag, value: v.clone(), source })?;
        out.extend(parsed);
    }
    Ok(out)
}

/// The request the flags describe.
fn request(args: &ObserveArgs, matches: &ArgMatches) -> Result<GetFlowsRequest, ObserveError> {
    args.cilium_only.check()?;
    let (occ, nots) = filters::occurrences(matches);
    let (mut whitelist, mut blacklist) = filters::build(&occ, &nots)?;
    whitelist.extend(raw_filters("allowlist", &args.allowlist)?);
    blacklist.extend(raw_filters("denylist", &args.denylist)?);
    FilterSet::new(&whitelist, &blacklist)
        .map_err(|source| FlagError::RawFilterValue { source })?;
    if let (Some(since), Some(until)) = (args.since, args.until)
        && (since.seconds, since.nanos) > (until.seconds, until.nanos)
    {
        return Err(FlagError::SinceAfterUntil { since, until }.into());
    }
    let (number, first) = match (args.all, args.first, args.last) {
        (true, _, _) => (u64::MAX, false),
        (false, Some(n), _) => (n, true),
        (false, None, Some(n)) => (n, false),
        (false, None, None)
            if args.follow
                || args.since.is_some()
                || args.until.is_some()
                || args.input_file.is_some() =>
        {
            (0, false)
        }
        (false, None, None) => (DEFAULT_LAST, false),
    };
    let json = matches!(args.output, Format::Json | Format::Jsonpb);
    let paths: Vec<String> = if !args.field_mask.is_empty() {
        if !json {
            return Err(FlagError::FieldMaskOutput { format: format_name(args.output) }.into());
        }
        FieldMask::new(&args.field_mask).map_err(FlagError::FieldMask)?;
        args.field_mask.clone()
    } else if args.use_default_field_masks && !json {
        DEFAULT_FIELD_MASK.iter().map(|&p| p.to_owned()).collect()
    } else {
        Vec::new()
    };
    Ok(GetFlowsRequest {
        number,
        first,
        follow: args.follow && args.input_file.is_none(),
        whitelist,
        blacklist,
        since: args.since,
        until: args.until,
        field_mask: (!paths.is_empty()).then_some(prost_types::FieldMask { paths }),
    })
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Compact => "compact",
        Format::Dict => "dict",
        Format::Table => "table",
        Format::Json => "json",
        Format::Jsonpb => "jsonpb",
        Format::None => "none",
    }
}

/// The allowlist and denylist as `hubble observe --print-raw-filters` prints them (YAML lists
/// of one-line JSON filters).
fn raw_filters_yaml(req: &GetFlowsRequest) -> String {
    let list = |name: &str, filters: &[FlowFilter]| {
        if filters.is_empty() {
            return String::new();
        }
        let mut out = format!("{name}:\n");
        for f in filters {
            let json = hopwatch_proto::flow_filter_to_json(f).replace('\'', "''");
            let _ = writeln!(out, "    - '{json}'");
        }
        out
    };
    let out = list("allowlist", &req.whitelist) + &list("denylist", &req.blacklist);
    if out.is_empty() { "{}\n".to_owned() } else { out }
}

async fn observe(args: ObserveArgs, matches: &ArgMatches) -> Result<(), ObserveError> {
    let req = request(&args, matches)?;
    if args.print_raw_filters {
        let mut stdout = std::io::stdout().lock();
        return write!(stdout, "{}", raw_filters_yaml(&req))
            .and_then(|()| stdout.flush())
            .map_err(ObserveError::Stdout);
    }
    let options = Options {
        format: args.output,
        time: args.time_format,
        node: args.print_node_name,
        color: args.color.enabled(),
        follow: args.follow && args.input_file.is_none(),
        numeric: args.numeric,
        quiet: args.silent_errors,
        summary: args.field_mask.is_empty() || args.field_mask.iter().any(|p| p == "Summary"),
    };
    let stdout = std::io::stdout();
    let mut printer = Printer::new(std::io::BufWriter::new(stdout.lock()), options);
    if let Some(path) = &args.input_file {
        let r = input::replay(path, &req, args.silent_errors, &mut printer);
        return finish(r, &mut printer);
    }
    let (uri, mut client) = args.connection.client(&args.server).await?;
    let mut stream =
        client.get_flows(req).await.map_err(|s| ServerError::status(&uri, s))?.into_inner();
    loop {
        match stream.message().await {
            Ok(Some(mut resp)) => {
                let mut r = printer.write(&mut resp);
                if r.is_ok() && args.follow {
                    r = printer.flush();
                }
                if let Err(e) = r {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(());
                    }
                    return Err(ObserveError::Stdout(e));
                }
            }
            Ok(None) => break,
            Err(s) => {
                let _ = printer.flush();
                return Err(ServerError::status(&uri, s).into());
            }
        }
    }
    finish(Ok(()), &mut printer)
}

/// Flushes what was printed; a reader that went away (a closed pipe) is not an error.
fn finish<W: std::io::Write>(
    r: Result<(), ObserveError>,
    printer: &mut Printer<W>,
) -> Result<(), ObserveError> {
    let r = match r {
        Err(ObserveError::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    };
    r?;
    match printer.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(ObserveError::Stdout(e)),
        _ => Ok(()),
    }
}

/// `-o`: every printer format except `none`, which only the agent has.
fn query_format(s: &str) -> Result<Format, FlagError> {
    match <Format as clap::ValueEnum>::from_str(s, true) {
        Ok(Format::None) | Err(_) => Err(FlagError::Output { value: s.to_owned() }),
        Ok(f) => Ok(f),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _};

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        observe: ObserveArgs,
    }

    fn request_for(args: &[&str]) -> Result<GetFlowsRequest, ObserveError> {
        let matches = Cli::command().try_get_matches_from([&["t"], args].concat()).expect("flags");
        let cli = Cli::from_arg_matches(&matches).expect("flags");
        request(&cli.observe, &matches)
    }

    #[test]
    fn a_since_after_until_is_a_flag_error() {
        let err = request_for(&["--since", "1m", "--until", "2h"]).unwrap_err();
        assert!(matches!(err, ObserveError::Flag(FlagError::SinceAfterUntil { .. })), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("--since 20") && msg.contains(" is after --until 20"), "{msg}");
        let req = request_for(&["--since", "2h", "--until", "1m", "--to-port", "80"]).unwrap();
        assert_eq!((req.number, req.whitelist.len()), (0, 1));
    }

    #[test]
    fn the_server_refusing_the_request_is_the_user_s_to_fix() {
        let uri = "http://127.0.0.1:4245";
        let rejected =
            ServerError::status(uri, tonic::Status::invalid_argument("since is after until"));
        assert!(matches!(rejected, ServerError::Rejected { .. }) && rejected.is_usage());
        assert_eq!(
            rejected.to_string(),
            format!("{uri} rejected the request: since is after until")
        );
        let source = std::error::Error::source(&rejected).expect("the status is the source");
        assert!(source.to_string().contains("since is after until"), "{source}");
        let failed = ServerError::status(uri, tonic::Status::unavailable("going away"));
        assert!(matches!(failed, ServerError::Failed { .. }) && !failed.is_usage());
        assert!(failed.to_string().starts_with(&format!("{uri}: ")), "{failed}");
    }
}
