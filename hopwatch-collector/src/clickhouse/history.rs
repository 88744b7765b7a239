//! `GetFlows` history from ClickHouse.
//!
//! Filters go down as SQL ([`crate::filter::sql`]) in `PREWHERE`, so only the narrow filter
//! columns are read for rows that cannot match; the full filter set then runs on each flow
//! decoded from its `flow` bytes. Lost-event notices (`kind = 2`) always come back: they are
//! sent to every reader, as the local store does.
//!
//! Pages are found in two steps: first the times of the next `n` candidates (only `time_ns`
//! and the filter columns are read), then the rows at or past the page's last time (the primary
//! index on `time` prunes everything older or newer). A page whose candidates the filter code
//! rejects is followed by the next one, until `number` flows matched or the range is done.

use std::fmt::Write as _;

use hopwatch_proto::observer::GetFlowsResponse;
use tokio::sync::mpsc;

use super::{ClickHouse, ClickHouseError, row};
use crate::{query::Query, store::Stored};

/// Candidates per page at most (unbounded queries stream in pages of this size).
const PAGE: u64 = 100_000;

/// Which way a query walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    OldestFirst,
    NewestFirst,
}

/// The SQL of one history read (pure, so tests can run it on other engines).
#[derive(Debug, Clone)]
pub struct Plan {
    table: String,
    prewhere: Option<String>,
    since_ns: Option<i64>,
    until_ns: Option<i64>,
}

fn secs(ns: i64) -> i64 {
    ns.div_euclid(1_000_000_000)
}

impl Plan {
    pub fn new(
        table: String,
        pushed: Option<String>,
        since: Option<i64>,
        until: Option<i64>,
    ) -> Self {
        Self {
            table,
            prewhere: pushed.map(|p| format!("(kind = {} OR {p})", row::KIND_LOST)),
            since_ns: since,
            until_ns: until,
        }
    }

    /// The time conditions, with `after`/`before` (exclusive) narrowing the range.
    fn range(
        &self,
        after: Option<i64>,
        before: Option<i64>,
        at_or_past: Option<(Order, i64)>,
    ) -> String {
        let mut w = String::from("1");
        let lo = self.since_ns;
        let hi = self.until_ns;
        if let Some(s) = lo {
            let _ = write!(w, " AND time >= toDateTime({}) AND time_ns >= {s}", secs(s).max(0));
        }
        if let Some(u) = hi {
            let _ = write!(w, " AND time <= toDateTime({}) AND time_ns <= {u}", secs(u).max(0));
        }
        if let Some(a) = after {
            let _ = write!(w, " AND time >= toDateTime({}) AND time_ns > {a}", secs(a).max(0));
        }
        if let Some(b) = before {
            let _ = write!(w, " AND time <= toDateTime({}) AND time_ns < {b}", secs(b).max(0));
        }
        match at_or_past {
            Some((Order::OldestFirst, t)) => {
                let _ = write!(w, " AND time <= toDateTime({}) AND time_ns <= {t}", secs(t).max(0));
            }
            Some((Order::NewestFirst, t)) => {
                let _ = write!(w, " AND time >= toDateTime({}) AND time_ns >= {t}", secs(t).max(0));
            }
            None => {}
        }
        w
    }

    fn prewhere(&self) -> String {
        self.prewhere.as_ref().map_or_else(String::new, |p| format!(" PREWHERE {p}"))
    }

    fn dir(order: Order) -> &'static str {
        if order == Order::NewestFirst { "DESC" } else { "ASC" }
    }

    /// Step 1: the times of the next `limit` candidates past the cursor.
    fn times(&self, order: Order, cursor: Option<i64>, limit: u64) -> String {
        let (after, before) = match order {
            Order::OldestFirst => (cursor, None),
            Order::NewestFirst => (None, cursor),
        };
        format!(
            "SELECT time_ns FROM {}{} WHERE {} ORDER BY time_ns {} LIMIT {limit}",
            self.table,
            self.prewhere(),
            self.range(after, before, None),
            Self::dir(order)
        )
    }

    /// Step 2: the candidates from the cursor through `edge` (the last time of step 1).
    fn rows(&self, order: Order, cursor: Option<i64>, edge: i64) -> String {
        let (after, before) = match order {
            Order::OldestFirst => (cursor, None),
            Order::NewestFirst => (None, cursor),
        };
        // Ties broken by node and uuid: every collector sends equal times in the same order.
        let d = Self::dir(order);
        format!(
            "SELECT time_ns, flow FROM {}{} WHERE {} ORDER BY time_ns {d}, node_name {d}, uuid {d}",
            self.table,
            self.prewhere(),
            self.range(after, before, Some((order, edge))),
        )
    }

    /// Both steps' SQL for a first page (for tests on other engines).
    pub fn sample(&self, newest_first: bool, limit: u64) -> [String; 2] {
        let order = if newest_first { Order::NewestFirst } else { Order::OldestFirst };
        [self.times(order, None, limit), self.rows(order, None, 0)]
    }
}

/// Runs `q`'s history on ClickHouse, sending each response into `tx` in time order (oldest
/// first). Returns false when the client left.
pub async fn run(
    ch: &ClickHouse,
    q: &Query,
    tx: &mpsc::Sender<Result<GetFlowsResponse, tonic::Status>>,
) -> Result<bool, ClickHouseError> {
    let plan = Plan::new(ch.layout.table(), q.filters().sql(), q.since_ns(), q.until_ns());
    let number = q.number();
    let order = if !q.first() && number > 0 { Order::NewestFirst } else { Order::OldestFirst };
    let mut cursor: Option<i64> = None;
    let mut flows = 0u64;
    let mut newest: Vec<GetFlowsResponse> = Vec::new();
    loop {
        let want = if number == 0 { PAGE } else { (number - flows).clamp(1, PAGE) };
        let sql = plan.times(order, cursor, want);
        let times: Vec<i64> = ch
            .client
            .query_raw(&sql)
            .fetch_all()
            .await
            .map_err(|source| ClickHouseError::Query { sql, source })?;
        let Some(&edge) = times.last() else { break };
        let sql = plan.rows(order, cursor, edge);
        let mut cursor_rows = ch
            .client
            .query_raw(&sql)
            .fetch::<row::StoredRow>()
            .map_err(|source| ClickHouseError::Query { sql: sql.clone(), source })?;
        while let Some(r) = cursor_rows
            .next()
            .await
            .map_err(|source| ClickHouseError::Query { sql: sql.clone(), source })?
        {
            let resp = row::decode(&r)
                .map_err(|source| ClickHouseError::Decode { time_ns: r.time_ns, source })?;
            let e = Stored::new(resp);
            let send_it = match q.wants(&e) {
                Some(true) if number == 0 || flows < number => {
                    flows += 1;
                    true
                }
                Some(false) => true,
                _ => false,
            };
            if !send_it {
                continue;
            }
            let resp = q.out(&e.resp);
            if order == Order::NewestFirst {
                newest.push(resp);
            } else if tx.send(Ok(resp)).await.is_err() {
                return Ok(false);
            }
        }
        cursor = Some(edge);
        if (times.len() as u64) < want || (number > 0 && flows >= number) {
            break;
        }
    }
    // Newest first was collected backwards: send oldest first, as the local store does.
    for resp in newest.into_iter().rev() {
        if tx.send(Ok(resp)).await.is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}
