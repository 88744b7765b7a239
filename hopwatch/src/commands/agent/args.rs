//! `hopwatch agent`'s flags: what it traces, how it reports, where flows go.

use std::time::Duration;

use crate::{loader, print::Format};

#[derive(Debug, Clone, clap::Args)]
#[expect(clippy::struct_excessive_bools, reason = "independent command-line switches")]
pub(in crate::commands) struct AgentArgs {
    /// Print what this kernel and process allow, then exit.
    #[arg(long)]
    pub probe: bool,
    /// Flow output format on stdout.
    #[arg(short, long, value_enum, default_value_t = Format::Compact)]
    pub output: Format,
    /// Node name put on every flow [default: the host name].
    #[arg(long, env = "HOPWATCH_NODE_NAME")]
    pub node_name: Option<String>,
    /// Interval between periodic reports of a long-lived connection's counters.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub update_interval: Duration,
    /// Do not trace kernel packet drops.
    #[arg(long)]
    pub no_drops: bool,
    /// Kernel drop reasons not to report (comma-separated names as this kernel spells them,
    /// e.g. `NOT_SPECIFIED`). Replaces the default list.
    #[arg(long, value_delimiter = ',', value_name = "REASON,...")]
    pub drop_ignore: Option<Vec<String>>,
    /// Which `kfree_skb` program reports drops: `auto` picks the one with the kernel's drop
    /// reasons where the kernel has them (5.17+); `no-reasons` is how older kernels are served
    /// (for testing that path on a newer kernel).
    #[arg(long, value_enum, default_value_t = loader::DropHook::Auto, hide = true)]
    pub drop_hook: loader::DropHook,
    /// Which hooks capture application payload: `auto` picks the socket layer's tracepoints
    /// where the kernel has them (6.3+) and syscall tracepoints otherwise; `syscalls` is how
    /// older kernels are served (for testing that path on a newer kernel).
    #[arg(long, value_enum, default_value_t = loader::L7Hook::Auto, hide = true)]
    pub l7_hook: loader::L7Hook,
    /// Drop events sent per CPU per second at most; the rest are counted as rate-limited.
    #[arg(long, default_value_t = 1000)]
    pub drops_per_sec: u32,
    /// Size of the kernel→agent ring buffer in bytes (a power of two, at least 4096).
    #[arg(long, value_parser = parse_ringbuf_bytes)]
    pub ringbuf_bytes: Option<u32>,
    /// Application payload bytes captured per message for L7 parsing (at most 1024; 0 turns
    /// L7 capture off).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub capture_bytes: u32,
    /// Do not attach the OpenSSL uprobes (no plaintext of TLS connections).
    #[arg(long)]
    pub no_tls: bool,
    /// Where the OpenSSL uprobes go: `auto` probes the internal read and write functions where
    /// `SSL_read`/`SSL_write` are recognised as wrappers around them (no debug trap per call),
    /// the exported functions otherwise; `exported` always probes the exported functions.
    #[arg(long, value_enum, default_value_t = loader::TlsProbes::Auto)]
    pub tls_probes: loader::TlsProbes,
    /// For the benchmark (`cargo xtask bench`): attach the OpenSSL uprobes with
    /// `--capture-bytes 0`, where their programs return at once, to measure what the probes
    /// alone cost an application.
    #[arg(long, hide = true, requires = "capture_bytes")]
    pub idle_tls_uprobes: bool,
    /// Measure every exchange from captured bytes in userspace; by default HTTP/1 connections
    /// that alternate request and response are handed to the kernel, which measures their
    /// exchanges and sends one record each.
    #[arg(long)]
    pub no_kernel_exchanges: bool,
    /// Do not link exchanges into traces (no per-thread request state in the kernel, no span
    /// ids, no trace ids beyond a request's own `traceparent`; flows are never held).
    #[arg(long)]
    pub no_request_tracing: bool,
    /// Do not attach the nginx uprobe (`ngx_chain_writer`) that links each nginx upstream
    /// request to the downstream request it serves; nginx's calls then link by thread causality
    /// and propagated ids only.
    #[arg(long)]
    pub no_nginx_uprobe: bool,
    /// Do not attach the Python uprobes (`PyIter_Send`, entry and return) that name the asyncio
    /// task behind each call of an asyncio server (uvicorn, aiohttp); its calls then link by
    /// thread causality and propagated ids only.
    #[arg(long)]
    pub no_python_uprobe: bool,
    /// Request headers whose values link a call to the request it was made for where thread
    /// causality cannot (an event loop's calls): an outbound request carrying the value that
    /// exactly one inbound request of the same process carried is its child. Comma-separated;
    /// `none` links by threads alone.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "traceparent,x-request-id,x-correlation-id,cf-ray",
        value_parser = ["none", "traceparent", "x-request-id", "x-correlation-id", "cf-ray"]
    )]
    pub trace_headers: Vec<String>,
    /// Addresses or CIDRs of the proxies in front of this node's servers (an ingress controller,
    /// a load balancer, cloudflared): on requests from them, `X-Forwarded-For`, `Forwarded`,
    /// `X-Real-IP` or `CF-Connecting-IP` name the real client (`client_ip`, `observe
    /// --client-ip`). Comma-separated; no peer is trusted by default.
    #[arg(long, value_delimiter = ',', value_name = "CIDR", value_parser = parse_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// A request unanswered this long is reported as timed out.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub l7_timeout: Duration,
    /// Keep full SQL statements and Redis arguments in L7 flows (debugging only: they may
    /// carry personal data). By default literals become `?` and arguments are dropped.
    #[arg(long)]
    pub keep_full_statements: bool,
    /// Also write every raw kernel event to FILE (for `hopwatch replay`); the file grows without
    /// bound while the agent runs.
    #[arg(long, value_name = "FILE")]
    pub record: Option<std::path::PathBuf>,
    /// Have the kernel count the run time of hopwatch's programs (a small cost per run) and
    /// print it at exit.
    #[arg(long)]
    pub bpf_stats: bool,
    /// Also show connections to the agent's own listeners (the in-process collector's API,
    /// `/metrics`): `hopwatch observe`, `hopwatch hops` and Prometheus scrapes of this agent.
    /// By default they are left out and counted (`hopwatch_flows_hidden_total`).
    #[arg(long)]
    pub show_own_traffic: bool,
    #[command(flatten)]
    pub metrics: crate::metrics::MetricsArgs,
    /// Endpoint names: Kubernetes, cgroups, Docker, static endpoints, DNS, translations.
    #[command(flatten)]
    pub identity: crate::identity::IdentityArgs,
    /// Where flows go besides stdout (a remote collector, or the in-process one).
    #[command(flatten)]
    pub sink: crate::sink::SinkArgs,
    /// The web UI over the in-process collector (none with --collector or --no-collector).
    #[command(flatten)]
    pub ui: crate::commands::ui::UiArgs,
    /// Which application exchanges become flows (all are counted in the metrics and hops).
    #[command(flatten)]
    pub l7_flows: crate::policy::RecordArgs,
    /// Traces to an OTLP backend, from the in-process collector.
    #[command(flatten)]
    pub otlp: crate::otlp::OtlpArgs,
}

/// A network (`10.0.0.0/8`) or one address (`10.0.0.5`).
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an address nor a CIDR (10.0.0.0/8)"))
}

fn parse_ringbuf_bytes(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if v < 4096 || !v.is_power_of_two() {
        return Err(format!("{v} is not a power of two of at least 4096"));
    }
    Ok(v)
}
