//! Identity: names every flow's ends the way their users name them — Kubernetes pods,
//! workloads and services, containers and systemd units on hosts without Kubernetes, static
//! endpoints, DNS names — and reports where a connection to a Service address really went.
//!
//! Sources are caches kept current by background tasks (API watches, cgroup walks, the Docker
//! API, a file reload, reverse lookups); [`Identity::process`] only reads them. Two answers are
//! worth a short wait: a client connection's first flow is held back (at most [`HOLD`]) until the
//! conntrack worker says which backend it reached, so even the CONNECT flow names the backend (the
//! connection's later flows reuse the answer), and a flow whose process sits in a cgroup the
//! cgroup walker has not seen yet (a container that just started) waits for the next walk.

pub(crate) mod cgroup;
pub(crate) mod ctnetlink;
pub(crate) mod dns;
#[cfg(feature = "docker")]
pub(crate) mod docker;
mod enrich;
pub(crate) mod kube;
pub(crate) mod nat;
pub(crate) mod static_endpoints;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use hopwatch_proto::{
    compact::Compact as _,
    flow::{Flow, FlowType, SocketEvent, TrafficDirection, layer4::Protocol},
};
use tokio_util::sync::CancellationToken;

#[cfg(feature = "docker")]
use self::docker::DockerNames;
pub(crate) use self::enrich::{Sources, enrich};
#[cfg(feature = "kubernetes")]
use self::kube::{KubeSource, PodScope};
use self::{
    cgroup::CgroupCache,
    dns::{DnsNames, ReverseDns},
    kube::store::KubeState,
    nat::Nat,
    static_endpoints::StaticEndpoints,
};
use crate::metrics::capability::Capability;

/// What Docker says about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DockerContainer {
    /// Name without Docker's leading `/`.
    pub(crate) name: String,
    /// `com.docker.compose.project` and `com.docker.compose.service`, when set.
    pub(crate) compose_project: Option<String>,
    pub(crate) compose_service: Option<String>,
}

/// Longest a flow waits for its connection's address translation.
pub(crate) const HOLD: Duration = Duration::from_millis(250);
/// Connections whose translation is remembered.
const MAX_TRANSLATIONS: usize = 131_072;
/// A closed connection's translation is kept this long for flows reported after the close.
const KEEP_AFTER_CLOSE: Duration = Duration::from_secs(5);
/// Conntrack lookups per second at most; connections beyond are not translated (and counted).
const MAX_LOOKUPS_PER_SEC: u32 = 20_000;
/// How often the static endpoints file is checked for changes.
const STATIC_RELOAD_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KubeMode {
    /// Use Kubernetes when the agent runs in a pod (in-cluster) or `--kubeconfig` is given.
    Auto,
    /// Require Kubernetes (fail when it is not configured).
    On,
    Off,
}

#[derive(Debug, Clone, clap::Args)]
#[expect(clippy::struct_excessive_bools, reason = "independent command-line switches")]
pub struct IdentityArgs {
    /// Kubernetes pod, workload and service names.
    #[arg(long, value_enum, default_value_t = KubeMode::Auto)]
    pub kubernetes: KubeMode,
    /// kubeconfig file for running outside the cluster [default: in-cluster configuration].
    #[arg(long, env = "HOPWATCH_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Watch every pod in the cluster rather than this node's (labels and workloads of remote
    /// pods too, at the cost of memory; remote pods behind Services are named either way).
    #[arg(long)]
    pub kube_all_pods: bool,
    /// How long a deleted pod's address and cgroup still name it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub pod_grace: Duration,
    /// Static endpoints file (YAML or JSON): names, namespaces and labels for addresses and
    /// prefixes nothing else names. Reloaded when it changes.
    #[arg(long, value_name = "PATH")]
    pub endpoints_file: Option<PathBuf>,
    /// Docker API socket for container names (used when it exists).
    #[arg(long, default_value = "/var/run/docker.sock", value_name = "PATH")]
    pub docker_socket: PathBuf,
    /// Do not ask the Docker API for container names.
    #[arg(long)]
    pub no_docker: bool,
    /// cgroup v2 mount [default: found in /proc/self/mountinfo].
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    /// Do not name processes by their cgroup (container id, pod, systemd unit).
    #[arg(long)]
    pub no_cgroup_names: bool,
    /// The host's /proc (to reach other network namespaces' connection tables).
    #[arg(long, default_value = "/proc", value_name = "PATH")]
    pub proc_root: PathBuf,
    /// Do not look up address translations (Service DNAT) in conntrack.
    #[arg(long)]
    pub no_translation: bool,
    /// Do not name addresses from the DNS answers the agent observes.
    #[arg(long)]
    pub no_dns_names: bool,
    /// Name addresses nothing else names by reverse DNS (PTR) lookups.
    #[arg(long)]
    pub reverse_dns: bool,
    /// Name server for reverse lookups [default: /etc/resolv.conf's].
    #[arg(long, value_name = "IP:PORT")]
    pub reverse_dns_server: Option<SocketAddr>,
    /// Reverse lookups per second at most.
    #[arg(long, default_value_t = 20)]
    pub reverse_dns_rate: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[cfg(feature = "kubernetes")]
    #[error(transparent)]
    Kube(#[from] kube::KubeError),
    #[cfg(not(feature = "kubernetes"))]
    #[error(
        "this hopwatch was built without Kubernetes support (cargo feature `kubernetes`): \
         leave out --kubernetes on and --kubeconfig"
    )]
    NoKubeSupport,
    #[error(
        "--kubernetes on: no Kubernetes configuration (not running in a pod: \
         KUBERNETES_SERVICE_HOST is unset; pass --kubeconfig)"
    )]
    NoKube,
    #[error(transparent)]
    Static(#[from] static_endpoints::StaticError),
    #[error(transparent)]
    Reverse(#[from] dns::ReverseError),
}

pub(crate) use hopwatch_proto::clock::now_ms;

/// Flows of one connection held back until what names them is known.
struct Held {
    since: Instant,
    flows: Vec<Flow>,
    /// A conntrack lookup is outstanding.
    nat_pending: bool,
    translated: Option<SocketAddr>,
}

/// Connections waiting for, or with, their translation, and flows waiting for a cgroup walk.
#[derive(Default)]
struct Holding {
    nat: Option<Nat>,
    known: HashMap<u64, Option<SocketAddr>>,
    held: HashMap<u64, Held>,
    closed: VecDeque<(u64, Instant)>,
    window: Option<(Instant, u32)>,
    /// Connections not looked up (rate or queue limit).
    skipped: u64,
    /// Connections whose flows were released without an answer.
    timed_out: u64,
}

pub struct Identity {
    #[cfg(feature = "kubernetes")]
    kube: Option<KubeSource>,
    statics: Option<Arc<RwLock<Arc<StaticEndpoints>>>>,
    cgroups: Option<CgroupCache>,
    #[cfg(feature = "docker")]
    docker: Option<DockerNames>,
    dns: Option<DnsNames>,
    reverse: Option<ReverseDns>,
    holding: Holding,
    /// Flows ready to be named, kept between calls for its capacity.
    ready: Vec<(Flow, Option<SocketAddr>)>,
    cancel: CancellationToken,
    /// The optional sources the flags asked for: running, or why not.
    capabilities: Vec<Capability>,
}

impl Identity {
    /// An identity layer with no sources (flows pass unchanged).
    pub fn disabled() -> Self {
        Self {
            #[cfg(feature = "kubernetes")]
            kube: None,
            statics: None,
            cgroups: None,
            #[cfg(feature = "docker")]
            docker: None,
            dns: None,
            reverse: None,
            holding: Holding::default(),
            ready: Vec::new(),
            cancel: CancellationToken::new(),
            capabilities: Vec::new(),
        }
    }

    /// No source and nothing held: flows pass unchanged, so they need not be moved through the
    /// holding area (the agent's per-flow path when no identity source is on).
    fn is_passthrough(&self) -> bool {
        self.kube_state().is_none()
            && self.statics.is_none()
            && self.cgroups.is_none()
            && !self.has_docker()
            && self.dns.is_none()
            && self.reverse.is_none()
            && self.holding.nat.is_none()
            && self.holding.held.is_empty()
    }

    /// The Kubernetes state, when the agent watches the API.
    #[cfg_attr(not(feature = "kubernetes"), expect(clippy::unused_self, reason = "no watches"))]
    fn kube_state(&self) -> Option<std::sync::RwLockReadGuard<'_, KubeState>> {
        #[cfg(feature = "kubernetes")]
        let state = self
            .kube
            .as_ref()
            .map(|k| k.state.read().unwrap_or_else(std::sync::PoisonError::into_inner));
        #[cfg(not(feature = "kubernetes"))]
        let state = None;
        state
    }

    #[cfg_attr(not(feature = "docker"), expect(clippy::unused_self, reason = "no Docker API"))]
    fn has_docker(&self) -> bool {
        #[cfg(feature = "docker")]
        let has = self.docker.is_some();
        #[cfg(not(feature = "docker"))]
        let has = false;
        has
    }

    /// Starts the sources the flags ask for; says on stderr which ones run.
    #[cfg_attr(
        not(feature = "kubernetes"),
        expect(clippy::unused_async, reason = "only the Kubernetes client awaits")
    )]
    pub async fn start(args: &IdentityArgs, node_name: &str) -> Result<Self, IdentityError> {
        let mut this = Self::disabled();
        let mut said = Vec::new();
        #[cfg(feature = "kubernetes")]
        this.start_kube(args, node_name, &mut said).await?;
        #[cfg(not(feature = "kubernetes"))]
        if args.kubernetes == KubeMode::On || args.kubeconfig.is_some() {
            return Err(IdentityError::NoKubeSupport);
        }
        #[cfg(not(feature = "kubernetes"))]
        let _ = node_name;
        if let Some(path) = &args.endpoints_file {
            let statics = StaticEndpoints::load(path)?;
            said.push(format!("static endpoints {} ({} entries)", path.display(), statics.len()));
            let shared = Arc::new(RwLock::new(Arc::new(statics)));
            tokio::spawn(reload_statics(path.clone(), shared.clone(), this.cancel.clone()));
            this.statics = Some(shared);
        }
        if !args.no_cgroup_names {
            if let Some(root) = args.cgroup_root.clone().or_else(cgroup::cgroup2_mount) {
                said.push(format!("cgroups {}", root.display()));
                this.capabilities.push(Capability::up("cgroup_names", root.display().to_string()));
                this.cgroups = Some(CgroupCache::start(root, this.cancel.clone()));
            } else {
                this.capabilities.push(Capability::down(
                    "cgroup_names",
                    "no cgroup v2 mount found: processes are not named by container or unit \
                     (fix: mount -t cgroup2 none /sys/fs/cgroup/unified, or --cgroup-root)",
                ));
            }
        }
        #[cfg(feature = "docker")]
        if !args.no_docker {
            let socket = &args.docker_socket;
            if socket.exists() {
                said.push(format!("docker {}", socket.display()));
                this.capabilities.push(Capability::up("docker", socket.display().to_string()));
                this.docker = Some(DockerNames::start(socket.clone(), this.cancel.clone()));
            } else {
                this.capabilities.push(Capability::down(
                    "docker",
                    format!(
                        "no Docker API socket at {}: containers are named by their cgroup id, \
                         not their Docker name (--docker-socket PATH, or --no-docker)",
                        socket.display()
                    ),
                ));
            }
        }
        if !args.no_dns_names {
            said.push("DNS names".to_owned());
            this.dns = Some(DnsNames::default());
        }
        if args.reverse_dns {
            said.push("reverse DNS".to_owned());
            this.reverse = Some(ReverseDns::start(
                args.reverse_dns_server,
                args.reverse_dns_rate,
                this.cancel.clone(),
            )?);
        }
        if !args.no_translation {
            // Optional: without conntrack's netlink interface (module nf_conntrack_netlink not
            // loaded, or a kernel without it) flows name what the application dialled, as
            // they would with --no-translation.
            match Nat::start(args.proc_root.clone()) {
                Ok(nat) => {
                    said.push("address translation (conntrack)".to_owned());
                    this.capabilities
                        .push(Capability::up("address_translation", "conntrack netlink"));
                    this.holding.nat = Some(nat);
                }
                Err(e) => this.capabilities.push(Capability::down(
                    "address_translation",
                    format!(
                        "cannot open conntrack netlink: {e}; Service translations \
                         (translated_destination) are not reported (fix: modprobe \
                         nf_conntrack_netlink, or --no-translation)"
                    ),
                )),
            }
        }
        eprintln!(
            "hopwatch agent: identity: {}",
            if said.is_empty() { "off".to_owned() } else { said.join(", ") }
        );
        Ok(this)
    }

    /// The optional sources the flags asked for, each running or with the reason it does not.
    pub(crate) fn capabilities(&self) -> &[Capability] {
        &self.capabilities
    }

    /// Starts the Kubernetes watches when the agent runs in a pod or `--kubeconfig` is given.
    #[cfg(feature = "kubernetes")]
    async fn start_kube(
        &mut self,
        args: &IdentityArgs,
        node_name: &str,
        said: &mut Vec<String>,
    ) -> Result<(), IdentityError> {
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let source = match (args.kubernetes, &args.kubeconfig) {
            (KubeMode::Off, _) => None,
            (_, Some(path)) => Some(kube::Source::Kubeconfig(path.clone())),
            (_, None) if in_cluster => Some(kube::Source::InCluster),
            (KubeMode::On, None) => return Err(IdentityError::NoKube),
            (KubeMode::Auto, None) => None,
        };
        if let Some(source) = source {
            let scope = if args.kube_all_pods {
                PodScope::All
            } else {
                PodScope::Node(node_name.to_owned())
            };
            let what = match &source {
                kube::Source::InCluster => "API watches (in-cluster configuration)".to_owned(),
                kube::Source::Kubeconfig(p) => format!("API watches ({})", p.display()),
            };
            match KubeSource::start(&source, &scope, args.pod_grace, &self.cancel).await {
                Ok(k) => self.kube = Some(k),
                // Asked for by name (--kubernetes on, --kubeconfig): a mistake to fix, not a
                // part to run without.
                Err(e) if args.kubernetes == KubeMode::On || args.kubeconfig.is_some() => {
                    return Err(e.into());
                }
                Err(e) => {
                    self.capabilities.push(Capability::down(
                        "kubernetes",
                        format!("{e}; flows carry no pod, workload or Service names"),
                    ));
                    return Ok(());
                }
            }
            self.capabilities.push(Capability::up("kubernetes", what));
            said.push(match scope {
                PodScope::All => "kubernetes (all pods)".to_owned(),
                PodScope::Node(n) => format!("kubernetes (pods on {n})"),
            });
        }
        Ok(())
    }

    /// Enriches the flows `out[from..]` in place; flows waiting for their connection's address
    /// translation or their process's cgroup are taken out and come back from [`Self::release`].
    pub fn process(&mut self, out: &mut Vec<Flow>, from: usize) {
        if from >= out.len() || self.is_passthrough() {
            return;
        }
        let now = Instant::now();
        // Reused across calls: this runs for nearly every kernel event.
        let mut ready = std::mem::take(&mut self.ready);
        for flow in out.drain(from..) {
            if let Some(dns) = &mut self.dns {
                dns.learn(&flow, now);
            }
            if let Some(flow) = self.holding.admit(flow, self.cgroups.as_ref(), now) {
                ready.push(flow);
            }
        }
        self.finish(&mut ready, out, now);
        self.ready = ready;
    }

    /// Gives back the room of connections gone (after a burst of them).
    pub fn compact(&mut self) {
        let h = &mut self.holding;
        h.known.compact();
        h.held.compact();
        h.closed.compact();
        self.ready.compact();
    }

    /// Releases held flows whose translation and cgroups are known, or who waited [`HOLD`].
    pub fn release(&mut self, out: &mut Vec<Flow>) {
        let now = Instant::now();
        let mut ready = self.holding.release(self.cgroups.as_ref(), now);
        self.finish(&mut ready, out, now);
    }

    /// Enriches the flows in `ready` into `out` (leaving `ready` empty).
    fn finish(
        &self,
        ready: &mut Vec<(Flow, Option<SocketAddr>)>,
        out: &mut Vec<Flow>,
        now: Instant,
    ) {
        if ready.is_empty() {
            return;
        }
        let kube = self.kube_state();
        let statics = self
            .statics
            .as_ref()
            .map(|s| s.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone());
        let sources = Sources {
            kube: kube.as_deref(),
            statics: statics.as_deref(),
            cgroups: self.cgroups.as_ref(),
            #[cfg(feature = "docker")]
            docker: self.docker.as_ref(),
            dns: self.dns.as_ref(),
            reverse: self.reverse.as_ref(),
            now,
        };
        for (mut flow, translated) in ready.drain(..) {
            enrich(&mut flow, translated, &sources);
            out.push(flow);
        }
    }

    /// One line on what the identity layer did, for the agent's exit summary.
    pub fn summary(&self) -> Option<String> {
        use std::sync::atomic::Ordering::Relaxed;
        let t = &self.holding;
        let s = &t.nat.as_ref()?.stats;
        Some(format!(
            "{} conntrack lookups, {} translated, {} not looked up (rate), {} released unanswered, {} in unreachable namespaces, {} errors",
            s.lookups.load(Relaxed),
            s.translated.load(Relaxed),
            t.skipped,
            t.timed_out,
            s.netns_unreachable.load(Relaxed),
            s.errors.load(Relaxed)
        ))
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(s) = self.summary() {
            eprintln!("hopwatch agent: identity: {s}");
        }
    }
}

/// A client's TCP connection flow: the end whose destination a Service translation rewrote.
fn wants_lookup(flow: &Flow) -> Option<ctnetlink::Tuple> {
    if flow.r#type() != FlowType::L3L4
        || flow.traffic_direction() != TrafficDirection::Egress
        || flow.socket_cookie == 0
    {
        return None;
    }
    if !matches!(
        flow.socket_event(),
        SocketEvent::Connect
            | SocketEvent::ConnectFailed
            | SocketEvent::Update
            | SocketEvent::Close
    ) {
        return None;
    }
    let Some(Protocol::Tcp(tcp)) = flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) else {
        return None;
    };
    let ip = flow.ip.as_ref()?;
    let src: std::net::IpAddr = ip.source.parse().ok()?;
    let dst: std::net::IpAddr = ip.destination.parse().ok()?;
    if dst.is_loopback() {
        return None;
    }
    Some(ctnetlink::Tuple {
        protocol: 6,
        src: SocketAddr::new(src, u16::try_from(tcp.source_port).ok()?),
        dst: SocketAddr::new(dst, u16::try_from(tcp.destination_port).ok()?),
    })
}

/// Whether a flow names a process whose cgroup a walk has not reached yet.
fn cgroup_pending(flow: &Flow, cgroups: Option<&CgroupCache>) -> bool {
    let Some(c) = cgroups else { return false };
    [&flow.source_process, &flow.destination_process]
        .into_iter()
        .flatten()
        .any(|p| matches!(c.lookup(p.cgroup_id), cgroup::Lookup::Pending))
}

impl Holding {
    /// Takes `flow` in: returns it (with its translation) when it can be named now, or holds it.
    fn admit(
        &mut self,
        flow: Flow,
        cgroups: Option<&CgroupCache>,
        now: Instant,
    ) -> Option<(Flow, Option<SocketAddr>)> {
        let cookie = flow.socket_cookie;
        if cookie != 0
            && matches!(flow.socket_event(), SocketEvent::Close | SocketEvent::ConnectFailed)
        {
            self.closed.push_back((cookie, now));
        }
        if let Some(held) = self.held.get_mut(&cookie) {
            // Behind the connection's earlier flows, in order.
            held.flows.push(flow);
            return None;
        }
        let mut translated = None;
        let mut nat_pending = false;
        if let Some(nat) = &self.nat {
            match self.known.get(&cookie) {
                Some(t) => translated = *t,
                None => {
                    if let Some(tuple) = wants_lookup(&flow) {
                        let window = self.window.get_or_insert((now, 0));
                        if now.duration_since(window.0) >= Duration::from_secs(1) {
                            *window = (now, 0);
                        }
                        window.1 += 1;
                        let request = nat::Request {
                            cookie,
                            netns: flow.netns_inode,
                            pid: flow.source_process.as_ref().map_or(0, |p| p.pid),
                            tuple,
                        };
                        if window.1 <= MAX_LOOKUPS_PER_SEC && nat.requests.try_send(request).is_ok()
                        {
                            nat_pending = true;
                        } else {
                            self.skipped += 1;
                        }
                    }
                }
            }
        }
        // Flows without a connection (drops) are never held: they have no key to queue under.
        if cookie == 0 || !nat_pending && !cgroup_pending(&flow, cgroups) {
            return Some((flow, translated));
        }
        self.held.insert(cookie, Held { since: now, flows: vec![flow], nat_pending, translated });
        None
    }

    fn release(
        &mut self,
        cgroups: Option<&CgroupCache>,
        now: Instant,
    ) -> Vec<(Flow, Option<SocketAddr>)> {
        let mut ready = Vec::new();
        if let Some(nat) = &self.nat {
            while let Ok(answer) = nat.answers.try_recv() {
                if self.known.len() >= MAX_TRANSLATIONS {
                    // Connections normally leave through `closed`; this bounds what they leave
                    // behind when their close was never seen.
                    self.known.clear();
                }
                self.known.insert(answer.cookie, answer.translated);
                if let Some(held) = self.held.get_mut(&answer.cookie) {
                    held.nat_pending = false;
                    held.translated = answer.translated;
                }
            }
        }
        let done: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, h)| {
                let waiting = h.nat_pending || h.flows.iter().any(|f| cgroup_pending(f, cgroups));
                !waiting || now.duration_since(h.since) >= HOLD
            })
            .map(|(c, _)| *c)
            .collect();
        for cookie in done {
            if let Some(held) = self.held.remove(&cookie) {
                if held.nat_pending {
                    self.timed_out += 1;
                }
                ready.extend(held.flows.into_iter().map(|f| (f, held.translated)));
            }
        }
        while let Some((cookie, at)) = self.closed.front().copied() {
            if now.duration_since(at) < KEEP_AFTER_CLOSE || self.held.contains_key(&cookie) {
                break;
            }
            self.closed.pop_front();
            self.known.remove(&cookie);
        }
        ready
    }
}

/// Reloads the static endpoints file when its modification time changes; a bad new version is
/// reported and the previous one kept.
async fn reload_statics(
    path: PathBuf,
    shared: Arc<RwLock<Arc<StaticEndpoints>>>,
    cancel: CancellationToken,
) {
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = modified(&path);
    let mut tick = tokio::time::interval(STATIC_RELOAD_EVERY);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = modified(&path);
        if now == last {
            continue;
        }
        last = now;
        match StaticEndpoints::load(&path) {
            Ok(s) => {
                eprintln!(
                    "hopwatch agent: identity: reloaded {} ({} entries)",
                    path.display(),
                    s.len()
                );
                *shared.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(s);
            }
            Err(e) => {
                tracing::error!(error = %crate::commands::error_chain(&e), "keeping the previous static endpoints");
            }
        }
    }
}
