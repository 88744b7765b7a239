//! Flow history on ClickHouse (`hopwatch collector --clickhouse URL`): what one collector's
//! embedded store cannot hold (one machine's disk and CPU) goes to a shared ClickHouse, and any
//! number of stateless collectors write to it and answer history queries from it.
//!
//! - Write path ([`writer`]): the store's writer offers every stored event to a bounded queue;
//!   a task inserts them in batches over HTTP, retrying with backoff; overflow is counted.
//! - Schema ([`schema`]): chosen by the server version at start, created if missing.
//! - Read path ([`history`]): `GetFlows` history from ClickHouse with the filters pushed down
//!   as SQL ([`crate::filter::sql`]); following (`-f`) stays live from the collector's memory.

pub mod history;
pub mod row;
pub mod schema;
pub mod writer;

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::{
    schema::{Layout, Variant, Version},
    writer::{Sink, WriterConfig},
};

#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    #[error(
        "cannot reach ClickHouse at {url} ({source}); check --clickhouse, that the server runs and \
         that --clickhouse-user/--clickhouse-password are right"
    )]
    Connect {
        url: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("ClickHouse at {url} answered version {version:?}, which hopwatch cannot parse")]
    Version { url: String, version: String },
    #[error("cannot create the flows table on ClickHouse: {source}; the statement was:\n{sql}")]
    Ddl {
        sql: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("cannot insert flows into ClickHouse table {table}: {source}")]
    Insert {
        table: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("ClickHouse history query failed: {source}; the query was:\n{sql}")]
    Query {
        sql: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("ClickHouse returned an undecodable flow (time {time_ns}): {source}")]
    Decode {
        time_ns: i64,
        #[source]
        source: prost::DecodeError,
    },
}

/// `hopwatch collector`'s ClickHouse options.
#[derive(Debug, Clone, clap::Args)]
pub struct ClickHouseArgs {
    /// Keep the flow history in ClickHouse at this HTTP(S) URL (e.g. http://clickhouse:8123);
    /// history queries are answered from it, so collectors need no local history. HTTPS trusts
    /// the system's roots (or the bundle in SSL_CERT_FILE).
    #[arg(long, value_name = "URL")]
    pub clickhouse: Option<String>,
    /// Database of the flows table (created if missing).
    #[arg(long, default_value = "hopwatch", value_name = "NAME")]
    pub clickhouse_database: String,
    /// Name of the flows table (created if missing; in a cluster, also `<NAME>_local`).
    #[arg(long, default_value = "flows", value_name = "NAME")]
    pub clickhouse_table: String,
    /// A cluster from the servers' `remote_servers`: a `Distributed` table over
    /// `ReplicatedMergeTree` shards, created `ON CLUSTER`.
    #[arg(long, value_name = "NAME")]
    pub clickhouse_cluster: Option<String>,
    /// ClickHouse user.
    #[arg(long, default_value = "default")]
    pub clickhouse_user: String,
    /// ClickHouse password (better from the environment than the command line).
    #[arg(long, env = "HOPWATCH_CLICKHOUSE_PASSWORD", hide_env_values = true)]
    pub clickhouse_password: Option<String>,
    /// Age after which flows leave ClickHouse (TTL on servers that have it, hourly partition
    /// drops on older ones).
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub clickhouse_retention: Duration,
    /// Flows waiting for ClickHouse at most (a ClickHouse outage shorter than this loses
    /// nothing; beyond it, flows are dropped and counted).
    #[arg(long, default_value_t = 2_000_000)]
    pub clickhouse_queue: usize,
    /// Flows per INSERT at most.
    #[arg(long, default_value_t = 100_000)]
    pub clickhouse_batch: usize,
    /// Concurrent INSERTs (each a server thread parsing rows: more use more server cores).
    #[arg(long, default_value_t = 2)]
    pub clickhouse_writers: usize,
    /// A partial batch is written after this long (history queries lag by about this much).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub clickhouse_flush_interval: Duration,
}

/// A connected ClickHouse history: its client, table, write queue and background tasks.
pub struct ClickHouse {
    pub client: clickhouse::Client,
    pub layout: Layout,
    pub version: Version,
    pub variant: Variant,
    pub sink: Arc<Sink>,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// How often legacy retention looks for expired partitions.
const RETENTION_EVERY: Duration = Duration::from_mins(5);

impl ClickHouse {
    /// Connects, reads the version, creates the tables if missing, and starts the writer (and,
    /// on servers without TTL, the partition-dropping retention task).
    pub async fn connect(args: &ClickHouseArgs, url: &str) -> Result<Arc<Self>, ClickHouseError> {
        let mut client = clickhouse::Client::default()
            .with_url(url)
            .with_user(&args.clickhouse_user)
            // 18.16 has no RowBinaryWithNamesAndTypes, which validation needs.
            .with_validation(false);
        if let Some(p) = &args.clickhouse_password {
            client = client.with_password(p);
        }
        let raw: String = client
            .query("SELECT version()")
            .fetch_one()
            .await
            .map_err(|source| ClickHouseError::Connect { url: url.to_owned(), source })?;
        let version = Version::parse(&raw)
            .ok_or_else(|| ClickHouseError::Version { url: url.to_owned(), version: raw })?;
        let variant = if version.is_modern() { Variant::Modern } else { Variant::Legacy };
        let layout = Layout {
            database: args.clickhouse_database.clone(),
            table: args.clickhouse_table.clone(),
            cluster: args.clickhouse_cluster.clone(),
            retention_s: args.clickhouse_retention.as_secs().max(3600),
        };
        for sql in layout.ddl(variant) {
            ddl(&client, &sql).await?;
        }
        tracing::info!(%url, %version, ?variant, table = %layout.table(), "flow history on ClickHouse");
        let cfg = WriterConfig {
            queue: args.clickhouse_queue,
            batch: args.clickhouse_batch.max(1),
            interval: args.clickhouse_flush_interval,
        };
        let sink = Sink::new(cfg.queue);
        let stop = CancellationToken::new();
        let mut tasks: Vec<JoinHandle<()>> = (0..args.clickhouse_writers.max(1))
            .map(|_| {
                tokio::spawn(writer::run(
                    client.clone(),
                    layout.table(),
                    sink.clone(),
                    cfg,
                    String::new(),
                    stop.clone(),
                ))
            })
            .collect();
        if variant == Variant::Legacy {
            tasks.push(tokio::spawn(retention(client.clone(), layout.clone(), stop.clone())));
        }
        Ok(Arc::new(Self {
            client,
            layout,
            version,
            variant,
            sink,
            stop,
            tasks: Mutex::new(tasks),
        }))
    }

    /// Events dropped because the write queue was full (`ServerStatus.flows_not_recorded`).
    pub fn dropped(&self) -> u64 {
        self.sink.stats.dropped.load(Ordering::Relaxed)
    }

    /// Writes what is queued (waiting at most `wait`) and stops the background tasks.
    pub async fn close(&self, wait: Duration) {
        self.stop.cancel();
        let tasks: Vec<_> = self.tasks.lock().expect("tasks lock").drain(..).collect();
        for t in tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(wait, t).await.is_err() {
                abort.abort();
            }
        }
    }

    /// The Prometheus text exposition of the write path's counters.
    pub fn metrics(&self) -> String {
        let s = &self.sink.stats;
        let mut out = String::new();
        for (name, kind, help, v) in [
            (
                "hopwatch_clickhouse_flows_written_total",
                "counter",
                "Events written to ClickHouse.",
                s.written.load(Ordering::Relaxed),
            ),
            (
                "hopwatch_clickhouse_flows_dropped_total",
                "counter",
                "Events dropped because the ClickHouse write queue was full (--clickhouse-queue).",
                s.dropped.load(Ordering::Relaxed),
            ),
            (
                "hopwatch_clickhouse_insert_failures_total",
                "counter",
                "ClickHouse inserts that failed (each retried with backoff).",
                s.failures.load(Ordering::Relaxed),
            ),
            (
                "hopwatch_clickhouse_queue_flows",
                "gauge",
                "Events waiting to be written to ClickHouse (queued, or in an insert not yet done).",
                s.queued.load(Ordering::Relaxed) + s.in_flight.load(Ordering::Relaxed),
            ),
            (
                "hopwatch_clickhouse_encoded_bytes_total",
                "counter",
                "Bytes of encoded events sent to ClickHouse (before compression).",
                s.encoded_bytes.load(Ordering::Relaxed),
            ),
        ] {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n");
        }
        out
    }
}

/// Runs one DDL statement. A dropped connection is retried (a few times, with backoff): a
/// pooled keep-alive connection the server has just closed fails the first send, and `ON
/// CLUSTER` statements wait on ZooKeeper, which may still be coming up beside the server.
async fn ddl(client: &clickhouse::Client, sql: &str) -> Result<(), ClickHouseError> {
    let backoff = hopwatch_proto::backoff::Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(2),
    };
    let mut attempt = 0;
    loop {
        match client.query_raw(sql).execute().await {
            Ok(()) => return Ok(()),
            Err(clickhouse::error::Error::Network(e)) if attempt < DDL_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "ClickHouse DDL: connection lost; retrying");
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt += 1;
            }
            Err(source) => return Err(ClickHouseError::Ddl { sql: sql.to_owned(), source }),
        }
    }
}

/// Tries of one DDL statement on network errors.
const DDL_ATTEMPTS: u32 = 5;

/// Legacy retention: drops hourly partitions older than the retention, now and every
/// [`RETENTION_EVERY`].
async fn retention(client: clickhouse::Client, layout: Layout, stop: CancellationToken) {
    loop {
        let sql = layout.expired_partitions_sql();
        match client.query_raw(&sql).fetch_all::<String>().await {
            Ok(parts) => {
                for p in parts {
                    let drop = layout.drop_partition_sql(&p);
                    match client.query_raw(&drop).execute().await {
                        Ok(()) => {
                            tracing::info!(partition = %p, "retention: dropped a ClickHouse partition");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, sql = %drop, "retention: cannot drop a ClickHouse partition");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention: cannot list ClickHouse partitions"),
        }
        tokio::select! {
            () = tokio::time::sleep(RETENTION_EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}
