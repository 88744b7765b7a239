//! Where the agent's flows go besides stdout: a remote collector (`--collector URL`) or the
//! collector the agent runs in-process (the default, on 127.0.0.1:4245).
//!
//! The agent pipeline hands every response to an [`Outlet`], which offers it to the collector
//! queue (never blocking: a full queue drops the newest and counts it) and then to the printer,
//! exactly as before.

pub(crate) mod link;
pub(crate) mod queue;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use hopwatch_collector::{
    self, CollectorError, StoreArgs,
    hub::{Hub, version},
    nodes::Connection,
    store::FlowStore,
};
use hopwatch_proto::{
    backoff::Backoff,
    flow::LostEventSource,
    hopwatch::v1::Hello,
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
    tls::{ClientTls, ServerTlsArgs, Target, TlsError},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::link::Batching;
use self::queue::Queue;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SinkError {
    #[error("--collector: {0}")]
    Target(#[source] TlsError),
    #[error("embedded collector: {0}")]
    Embedded(#[source] CollectorError),
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SinkArgs {
    /// Stream flows to this collector instead of running one in-process:
    /// <https://host:4245> (TLS), or <http://host:4245> on loopback or with --allow-plaintext.
    #[arg(long, env = "HOPWATCH_COLLECTOR", value_name = "URL")]
    pub collector: Option<String>,
    /// Address of the in-process collector's APIs [default: 127.0.0.1:4245; if that port is
    /// taken, the agent runs without it and says so].
    #[arg(long, conflicts_with = "collector")]
    pub listen: Option<SocketAddr>,
    /// Run no collector at all (flows only go to stdout).
    #[arg(long, conflicts_with_all = ["collector", "listen"])]
    pub no_collector: bool,
    /// On-disk history of the in-process collector [default: memory only].
    #[arg(long, conflicts_with = "collector")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// TLS: with --collector, --tls-cert/--tls-key are this agent's client certificate (mutual
    /// TLS); without it, they are the in-process collector's server certificate.
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// CA that signed the collector's certificate (with --collector https://...).
    #[arg(long, value_name = "PEM", requires = "collector")]
    pub tls_ca: Option<PathBuf>,
    /// Name expected in the collector's certificate [default: the host in --collector].
    #[arg(long, requires = "collector")]
    pub tls_server_name: Option<String>,
    /// Events waiting for the collector at most (unacknowledged ones included); beyond this the
    /// newest are dropped, counted, and reported as lost events.
    #[arg(long, default_value_t = 65_536)]
    pub queue_flows: usize,
    /// Events per batch at most.
    #[arg(long, default_value_t = 1000)]
    pub batch_flows: usize,
    /// A partial batch is sent after this long.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub batch_interval: Duration,
    /// Longest wait between reconnection attempts (exponential backoff with jitter up to this).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub reconnect_max: Duration,
}

/// The agent's side of the pipeline to the printer and the collector.
#[derive(Clone)]
pub(crate) struct Outlet {
    /// `None` with `-o none`: nothing prints, so flows are not handed to a printer at all.
    printer: Option<mpsc::Sender<GetFlowsResponse>>,
    queue: Option<Arc<Queue>>,
    /// The in-process collector's store, whose readers are the agent's followers.
    store: Option<Arc<FlowStore>>,
}

/// The sending end of the agent's output: the collector queue, and a bounded channel to the
/// printer when `print` (returned as the receiving end).
pub(crate) fn channel(
    cap: usize,
    sink: &Sink,
    print: bool,
) -> (Outlet, Option<mpsc::Receiver<GetFlowsResponse>>) {
    let (printer, rx) = if print {
        let (tx, rx) = mpsc::channel(cap);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let store = sink.embedded.as_ref().map(|e| e.hub.store.clone());
    (Outlet { printer, queue: sink.queue.clone(), store }, rx)
}

/// The printer's queue was full: the flow went to the collector (if any) but was not printed.
#[derive(Debug)]
pub(crate) struct PrinterFull;

impl Outlet {
    /// Offers a flow to the collector queue, then to the printer (which may refuse it when full).
    /// The flow is copied only when both take it.
    pub(crate) fn try_send(&self, resp: GetFlowsResponse) -> Result<(), PrinterFull> {
        match (&self.queue, &self.printer) {
            (Some(q), Some(p)) => {
                q.offer(resp.clone());
                p.try_send(resp).map_err(|_| PrinterFull)
            }
            (Some(q), None) => {
                q.offer(resp);
                Ok(())
            }
            (None, Some(p)) => p.try_send(resp).map_err(|_| PrinterFull),
            (None, None) => Ok(()),
        }
    }

    /// Events the collector queue dropped so far and events waiting in it now (unacknowledged
    /// ones included); zeros without a collector.
    pub(crate) fn collector_queue(&self) -> (u64, u64) {
        self.queue.as_ref().map_or((0, 0), |q| {
            let s = q.status();
            (s.queue_dropped, s.queue_len)
        })
    }

    /// Someone reads the in-process collector's flows as they come (`observe -f`, or a query
    /// running now).
    pub(crate) fn followed(&self) -> bool {
        self.store.as_ref().is_some_and(|s| s.readers() > 0)
    }

    /// The running total of exchanges not recorded, for the collector's view of this agent.
    pub(crate) fn not_recorded(&self, total: u64) {
        if let Some(q) = &self.queue {
            q.set_not_recorded(total);
        }
    }

    /// Sends a lost-event notice to the printer (waiting for room) and to the collector queue.
    pub(crate) async fn send(&self, resp: GetFlowsResponse) {
        if let Some(q) = &self.queue
            && !printer_only(&resp)
        {
            q.offer(resp.clone());
        }
        if let Some(p) = &self.printer {
            // A closed printer (stdout gone) has nothing left to tell.
            let _ = p.send(resp).await;
        }
    }
}

/// The pipeline's `OBSERVER_EVENTS_QUEUE` notices count flows its printer queue dropped; the
/// collector got those flows (the queue feeds it first), and its own queue reports its drops.
fn printer_only(resp: &GetFlowsResponse) -> bool {
    matches!(&resp.response_types, Some(ResponseTypes::LostEvents(l)) if l.source() == LostEventSource::ObserverEventsQueue)
}

/// The collector side of a running agent.
pub(crate) struct Sink {
    queue: Option<Arc<Queue>>,
    link: Option<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
    embedded: Option<Embedded>,
}

struct Embedded {
    hub: Arc<Hub>,
    server: Option<hopwatch_collector::Serving>,
    server_stop: CancellationToken,
}

impl Sink {
    /// A sink that sends nowhere (`--no-collector`).
    pub(crate) fn none() -> Self {
        Self { queue: None, link: None, stop: CancellationToken::new(), embedded: None }
    }

    /// Where the in-process collector's APIs listen, when they do.
    pub(crate) fn listen_addr(&self) -> Option<SocketAddr> {
        self.embedded.as_ref()?.server.as_ref().map(|s| s.addr)
    }

    /// The in-process collector's hub (what the web UI reads), when the agent runs one.
    pub(crate) fn hub(&self) -> Option<Arc<Hub>> {
        self.embedded.as_ref().map(|e| e.hub.clone())
    }

    /// Delivers what is queued (bounded by a drain timeout), then stops the embedded collector.
    pub(crate) async fn close(mut self) {
        if let Some(q) = &self.queue {
            q.close();
        }
        self.stop.cancel();
        if let Some(link) = self.link.take() {
            let _ = link.await;
        }
        if let Some(q) = &self.queue
            && q.dropped() > 0
        {
            eprintln!("hopwatch agent: {} events dropped at the collector queue", q.dropped());
        }
        if let Some(e) = self.embedded.take() {
            e.server_stop.cancel();
            if let Some(s) = e.server {
                let _ = tokio::time::timeout(Duration::from_secs(5), s.task).await;
            }
            e.hub.shutdown().await;
        }
    }
}

/// Starts what `args` ask for: the link to a remote collector, or the embedded collector.
pub(crate) async fn start(args: &SinkArgs, node_name: &str) -> Result<Sink, SinkError> {
    if args.no_collector {
        return Ok(Sink::none());
    }
    let batching = Batching { max_events: args.batch_flows.max(1), interval: args.batch_interval };
    let queue = Arc::new(Queue::new(args.queue_flows, node_name));
    let stop = CancellationToken::new();
    let hello = Hello {
        agent_id: uuid::Uuid::new_v4().to_string(),
        node_name: node_name.to_owned(),
        version: version(),
        started: Some(prost_types::Timestamp::from(SystemTime::now())),
    };
    if let Some(url) = &args.collector {
        let tls = ClientTls {
            ca: args.tls_ca.clone(),
            cert: args.tls.tls_cert.clone(),
            key: args.tls.tls_key.clone(),
            server_name: args.tls_server_name.clone(),
            flags: hopwatch_proto::tls::ClientFlags::default(),
        };
        let target = Target::parse(url, false).map_err(SinkError::Target)?;
        let endpoint =
            target.endpoint(&tls, args.tls.allow_plaintext).map_err(SinkError::Target)?;
        let backoff = Backoff { initial: Duration::from_millis(100), max: args.reconnect_max };
        eprintln!("hopwatch agent: streaming flows to collector {}", target.uri);
        let link = tokio::spawn(link::run_remote(
            queue.clone(),
            link::dial(endpoint),
            target.uri,
            hello,
            batching,
            backoff,
            stop.clone(),
        ));
        return Ok(Sink { queue: Some(queue), link: Some(link), stop, embedded: None });
    }

    let explicit = args.listen.is_some();
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], hopwatch_proto::DEFAULT_PORT)));
    let tls = args.tls.server_config(listen).map_err(|e| SinkError::Embedded(e.into()))?;
    let hub = Hub::start(&args.store.hub_config(args.data_dir.clone()))
        .map_err(|e| SinkError::Embedded(e.into()))?;
    let server_stop = CancellationToken::new();
    let server = match hopwatch_collector::serve(hub.clone(), listen, tls, server_stop.clone())
        .await
    {
        Ok(s) => {
            eprintln!(
                "hopwatch agent: collector APIs on {} (query with `hopwatch observe`)",
                s.addr
            );
            Some(s)
        }
        Err(e @ CollectorError::Listen { .. }) if !explicit => {
            // The default port is taken (another agent or collector on this host): keep tracing
            // and printing; only the query API is missing.
            eprintln!(
                "hopwatch agent: warning: {e}; running without the in-process collector's APIs (use --listen ADDR or --collector URL)"
            );
            None
        }
        Err(e) => {
            hub.shutdown().await;
            return Err(SinkError::Embedded(e));
        }
    };
    let agent = hub.agent(&hello.agent_id, node_name);
    hub.nodes.connected(&Connection {
        node_name: node_name.to_owned(),
        version: version(),
        address: "in-process".to_owned(),
        tls: None,
        started: Some(SystemTime::now()),
    });
    let link =
        tokio::spawn(link::run_local(queue.clone(), hub.clone(), agent, batching, stop.clone()));
    Ok(Sink {
        queue: Some(queue),
        link: Some(link),
        stop,
        embedded: Some(Embedded { hub, server, server_stop }),
    })
}

#[cfg(test)]
mod tests;
