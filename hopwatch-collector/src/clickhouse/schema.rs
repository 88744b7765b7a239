//! The flows table, chosen by the server's version (`SELECT version()` at start) and created if
//! missing.
//!
//! Both variants have the same columns and types, so one [`super::row::FlowRow`] and one query
//! dialect serve every server; what differs is storage:
//!
//! - **Legacy** (below 20.3, e.g. Debian's 18.16): plain types, LZ4 (the server default), no TTL
//!   (retention drops whole hourly partitions, see [`retention_sql`]), no skip indexes.
//! - **Modern** (20.3 and later): column codecs (Delta/DoubleDelta/T64 + ZSTD), `LowCardinality`
//!   for names with few values, `TTL` with `ttl_only_drop_parts` (whole parts go, no rewrites),
//!   and skip indexes for the rare-value lookups (trace id, destination port, pods).
//!
//! Layout for the queries users run: `PARTITION BY toStartOfHour(time)` (retention drops hours;
//! a `--since` range touches only its hours) and `ORDER BY (time, node_name)`: every history
//! query has a time range and the newest/oldest-first order, so the primary index prunes by time
//! and the filters run as `PREWHERE` over the few narrow columns they name before the wide
//! `flow` column is read.
//!
//! In a cluster (`--clickhouse-cluster NAME`), each shard holds `<table>_local`
//! (`ReplicatedMergeTree`, created `ON CLUSTER`), and `<table>` is a `Distributed` table over
//! them, sharded by `cityHash64(node_name)`: a node's flows stay on one shard, in order.

use std::fmt::Write as _;

/// A server version, as `SELECT version()` says it (`18.16.1`, `24.8.4.13`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

impl Version {
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.trim().split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        Some(Self { major, minor })
    }

    /// Codecs (19.1), TTL (19.6), skip indexes without experimental flags and `LowCardinality`
    /// by default: all there from 20.3 on.
    pub fn is_modern(self) -> bool {
        self >= Self { major: 20, minor: 3 }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Which DDL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Legacy,
    Modern,
}

/// Where the table lives.
#[derive(Debug, Clone)]
pub struct Layout {
    pub database: String,
    pub table: String,
    /// `Some`: a `Distributed` table over `ReplicatedMergeTree` shards of this cluster.
    pub cluster: Option<String>,
    /// Retention by age, in seconds.
    pub retention_s: u64,
}

/// An identifier, back-quoted.
pub fn ident(s: &str) -> String {
    format!("`{}`", s.replace('\\', "\\\\").replace('`', "\\`"))
}

impl Layout {
    /// The table queries and inserts go to.
    pub fn table(&self) -> String {
        format!("{}.{}", ident(&self.database), ident(&self.table))
    }

    /// The table holding the data (the shards' local table in a cluster).
    pub fn data_table(&self) -> String {
        match &self.cluster {
            Some(_) => format!("{}.{}", ident(&self.database), ident(&self.local_name())),
            None => self.table(),
        }
    }

    fn local_name(&self) -> String {
        format!("{}_local", self.table)
    }

    fn on_cluster(&self) -> String {
        self.cluster.as_ref().map_or_else(String::new, |c| format!(" ON CLUSTER {}", ident(c)))
    }

    /// The statements that create the database and tables, in order (each `IF NOT EXISTS`; on
    /// modern servers, then the retention's TTL).
    pub fn ddl(&self, variant: Variant) -> Vec<String> {
        let mut out = vec![format!(
            "CREATE DATABASE IF NOT EXISTS {}{}",
            ident(&self.database),
            self.on_cluster()
        )];
        let engine = match &self.cluster {
            Some(_) => format!(
                "ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{}/{}', '{{replica}}')",
                self.database,
                self.local_name()
            ),
            None => "MergeTree".to_owned(),
        };
        let mut t = format!(
            "CREATE TABLE IF NOT EXISTS {}{} (\n{}\n) ENGINE = {engine}\nPARTITION BY toStartOfHour(time)\nORDER BY (time, node_name)",
            self.data_table(),
            self.on_cluster(),
            columns(variant)
        );
        match variant {
            Variant::Legacy => t.push_str("\nSETTINGS index_granularity = 8192"),
            Variant::Modern => {
                let _ = write!(
                    t,
                    "\nTTL time + toIntervalSecond({})\nSETTINGS index_granularity = 8192, ttl_only_drop_parts = 1",
                    self.retention_s
                );
            }
        }
        out.push(t);
        if variant == Variant::Modern {
            // An existing table keeps the TTL it was created with: set this run's retention.
            out.push(format!(
                "ALTER TABLE {}{} MODIFY TTL time + toIntervalSecond({})",
                self.data_table(),
                self.on_cluster(),
                self.retention_s
            ));
        }
        if let Some(cluster) = &self.cluster {
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {}{} AS {}\nENGINE = Distributed({}, {}, {}, cityHash64(node_name))",
                self.table(),
                self.on_cluster(),
                self.data_table(),
                ident(cluster),
                ident(&self.database),
                ident(&self.local_name()),
            ));
        }
        out
    }

    /// Legacy retention: the hourly partitions entirely older than the retention (their names,
    /// as `ALTER TABLE ... DROP PARTITION` takes them).
    pub fn expired_partitions_sql(&self) -> String {
        format!(
            "SELECT DISTINCT partition FROM system.parts WHERE database = {} AND table = {} AND active \
             AND toDateTime(partition) + 3600 <= now() - {}",
            crate::filter::sql::literal(&self.database),
            crate::filter::sql::literal(
                match &self.cluster {
                    Some(_) => self.local_name(),
                    None => self.table.clone(),
                }
                .as_str()
            ),
            self.retention_s
        )
    }

    /// Drops one partition (as [`Self::expired_partitions_sql`] names it: its hour, unquoted).
    pub fn drop_partition_sql(&self, partition: &str) -> String {
        format!(
            "ALTER TABLE {}{} DROP PARTITION {}",
            self.data_table(),
            self.on_cluster(),
            crate::filter::sql::literal(partition)
        )
    }
}

/// The column list. Same names and types in both variants (one row format, one dialect);
/// the modern one adds codecs, `LowCardinality` and skip indexes.
pub fn columns(variant: Variant) -> String {
    let modern = variant == Variant::Modern;
    let lc = |t: &str| if modern { format!("LowCardinality({t})") } else { t.to_owned() };
    let c = |codec: &str| if modern { format!(" CODEC({codec})") } else { String::new() };
    let int = c("T64, ZSTD(1)");
    let cols: Vec<(&str, String)> = vec![
        ("time", format!("DateTime{}", c("DoubleDelta, ZSTD(1)"))),
        ("time_ns", format!("Int64{}", c("DoubleDelta, ZSTD(1)"))),
        ("kind", "UInt8".into()),
        ("node_name", lc("String")),
        ("uuid", format!("String{}", c("ZSTD(1)"))),
        ("verdict", format!("Int32{int}")),
        ("drop_reason", format!("Int32{int}")),
        ("event_type", format!("Int32{int}")),
        ("direction", format!("Int32{int}")),
        ("is_reply", "UInt8".into()),
        ("ip_version", format!("Int32{int}")),
        ("src_ip4", format!("UInt32{}", c("ZSTD(1)"))),
        ("dst_ip4", format!("UInt32{}", c("ZSTD(1)"))),
        ("src_ip6", format!("FixedString(16){}", c("ZSTD(1)"))),
        ("dst_ip6", format!("FixedString(16){}", c("ZSTD(1)"))),
        ("src_port", format!("UInt16{int}")),
        ("dst_port", format!("UInt16{int}")),
        ("l4_protocol", lc("String")),
        ("src_identity", format!("UInt32{int}")),
        ("dst_identity", format!("UInt32{int}")),
        ("src_namespace", lc("String")),
        ("src_pod", format!("String{}", c("ZSTD(1)"))),
        ("src_workloads", format!("Array({})", lc("String"))),
        ("src_service_namespace", lc("String")),
        ("src_service", lc("String")),
        ("dst_namespace", lc("String")),
        ("dst_pod", format!("String{}", c("ZSTD(1)"))),
        ("dst_workloads", format!("Array({})", lc("String"))),
        ("dst_service_namespace", lc("String")),
        ("dst_service", lc("String")),
        ("l7_protocol", lc("String")),
        ("http_method", lc("String")),
        ("http_code", format!("UInt16{int}")),
        ("latency_ns", format!("UInt64{int}")),
        ("trace_id", format!("String{}", c("ZSTD(1)"))),
        ("flow", format!("String{}", c("ZSTD(3)"))),
    ];
    debug_assert_eq!(
        cols.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        super::row::COLUMNS,
        "the DDL's columns are FlowRow's, in order"
    );
    let mut out: Vec<String> = cols.into_iter().map(|(n, t)| format!("    {n} {t}")).collect();
    if modern {
        out.extend([
            "    INDEX trace_idx trace_id TYPE bloom_filter(0.01) GRANULARITY 4".to_owned(),
            "    INDEX dport_idx dst_port TYPE set(1024) GRANULARITY 4".to_owned(),
            "    INDEX pods_idx (src_pod, dst_pod) TYPE bloom_filter(0.01) GRANULARITY 4"
                .to_owned(),
        ]);
    }
    out.join(",\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(cluster: Option<&str>) -> Layout {
        Layout {
            database: "hopwatch".into(),
            table: "flows".into(),
            cluster: cluster.map(Into::into),
            retention_s: 86_400,
        }
    }

    #[test]
    fn versions_pick_the_variant() {
        assert!(!Version::parse("18.16.1").unwrap().is_modern());
        assert!(!Version::parse("19.17.4.11").unwrap().is_modern());
        assert!(Version::parse("20.3.1").unwrap().is_modern());
        assert!(Version::parse("26.9.1.1").unwrap().is_modern());
        assert_eq!(Version::parse("x"), None);
    }

    #[test]
    fn legacy_ddl_has_no_modern_syntax() {
        let ddl = layout(None).ddl(Variant::Legacy).join("\n");
        for modern in ["CODEC", "TTL", "LowCardinality", "INDEX", "IPv6"] {
            assert!(!ddl.contains(modern), "{modern} in {ddl}");
        }
        assert!(ddl.contains("PARTITION BY toStartOfHour(time)"));
    }

    #[test]
    fn cluster_ddl_is_distributed_over_replicated_shards() {
        assert_eq!(layout(Some("two")).ddl(Variant::Modern).len(), 4, "with MODIFY TTL");
        let ddl = layout(Some("two")).ddl(Variant::Legacy);
        assert_eq!(ddl.len(), 3);
        assert!(ddl[1].contains("`hopwatch`.`flows_local` ON CLUSTER `two`"), "{}", ddl[1]);
        assert!(ddl[1].contains(
            "ReplicatedMergeTree('/clickhouse/tables/{shard}/hopwatch/flows_local', '{replica}')"
        ));
        assert!(
            ddl[2].contains("Distributed(`two`, `hopwatch`, `flows_local`, cityHash64(node_name))")
        );
    }
}
