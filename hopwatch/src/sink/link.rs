//! Moving queued events to a collector: over gRPC to a remote one (batches, acknowledgements,
//! reconnection with exponential backoff and jitter, resume by sequence number), or straight
//! into the embedded one.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use hopwatch_collector::{agents::AgentState, hub::Hub};
use hopwatch_proto::{
    backoff::Backoff,
    clock,
    hopwatch::v1::{
        Batch, Hello, PushRequest, ingest_client::IngestClient, push_request, push_response,
    },
    tls::explain,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::queue::{Outgoing, Queue};

/// Opens a connection to the collector (a real endpoint, or an in-memory pipe in tests).
pub(crate) type Dial = Arc<
    dyn Fn() -> std::pin::Pin<
            Box<dyn Future<Output = Result<Channel, tonic::transport::Error>> + Send>,
        > + Send
        + Sync,
>;

pub fn dial(endpoint: Endpoint) -> Dial {
    Arc::new(move || {
        let ep = endpoint.clone();
        Box::pin(async move { ep.connect().await })
    })
}

/// After shutdown is asked, how long the agent keeps trying to deliver what it queued.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_events: usize,
    pub interval: Duration,
}

/// Waits until a batch is due: `max_events` unsent, or the oldest unsent waited `interval`
/// (`deadline` remembers when that is, across calls). Returns false on `stop`.
async fn batch_due(
    queue: &Queue,
    batching: Batching,
    deadline: &mut Option<tokio::time::Instant>,
    stop: &CancellationToken,
) -> bool {
    loop {
        let unsent = queue.unsent();
        if unsent >= batching.max_events {
            return true;
        }
        if unsent > 0 {
            let d =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + batching.interval);
            if tokio::time::Instant::now() >= d {
                return true;
            }
        }
        let notified = queue.notify.notified();
        tokio::select! {
            () = notified => {}
            () = clock::sleep_until(*deadline) => return true,
            () = stop.cancelled() => return false,
        }
    }
}

fn batch(out: &Outgoing, queue: &Queue) -> PushRequest {
    PushRequest {
        message: Some(push_request::Message::Batch(Batch {
            first_seq: out.first_seq,
            events: out.events.iter().map(|e| prost::Message::encode_to_vec(e).into()).collect(),
            status: Some(queue.status()),
        })),
    }
}

/// Streams into the embedded collector until `stop`, then hands over what is left.
/// Events handed to the in-process collector at a time.
const LOCAL_BATCH: usize = 64;

pub(crate) async fn run_local(
    queue: Arc<Queue>,
    hub: Arc<Hub>,
    agent: Arc<AgentState>,
    batching: Batching,
    stop: CancellationToken,
) {
    let mut deadline = None;
    loop {
        let more = batch_due(&queue, batching, &mut deadline, &stop).await;
        deadline = None;
        // In-process there is nothing to resend after a failure: the collector has what it was
        // handed, so events are moved out of the queue rather than copied and acknowledged. In
        // small batches: a batch of a thousand flows is a megabyte the allocator takes fresh
        // from the system (page faults, zeroing) and hands back, every batch.
        while let Some(out) = queue.pop(batching.max_events.min(LOCAL_BATCH)) {
            let status = queue.status();
            if hub.accept(&agent, out.first_seq, out.events, Some(&status)).await.is_err() {
                return;
            }
        }
        if !more {
            return;
        }
    }
}

/// Why a session with the collector ended.
enum End {
    /// Shutdown: everything was delivered (or the drain time ran out).
    Done,
    /// The connection failed or broke; `bool` says whether it got as far as the Welcome.
    Broken(String, bool),
}

/// Streams to a remote collector until `stop`, reconnecting as needed.
pub async fn run_remote(
    queue: Arc<Queue>,
    dial: Dial,
    target: String,
    hello: Hello,
    batching: Batching,
    backoff: Backoff,
    stop: CancellationToken,
) {
    let mut attempt = 0u32;
    let mut last_error = String::new();
    let mut drain_deadline: Option<Instant> = None;
    loop {
        match session(&queue, &dial, &hello, batching, &stop).await {
            End::Done => break,
            End::Broken(why, welcomed) => {
                if welcomed {
                    attempt = 0;
                }
                if why != last_error {
                    tracing::warn!(collector = %target, error = %why, "collector unreachable; queueing flows and retrying");
                    eprintln!("hopwatch agent: collector {target}: {why} (retrying)");
                    last_error = why;
                }
            }
        }
        if stop.is_cancelled() {
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_TIMEOUT);
            if queue.is_drained() || Instant::now() >= deadline {
                break;
            }
        }
        let delay = backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled(), if drain_deadline.is_none() => {}
        }
    }
    if !queue.is_drained() {
        let left = queue.status().queue_len;
        tracing::warn!(collector = %target, events = left, "events not delivered to the collector at shutdown");
        eprintln!(
            "hopwatch agent: {left} events could not be delivered to collector {target} before shutdown"
        );
    }
}

async fn session(
    queue: &Queue,
    dial: &Dial,
    hello: &Hello,
    batching: Batching,
    stop: &CancellationToken,
) -> End {
    let channel = match dial().await {
        Ok(c) => c,
        Err(e) => return End::Broken(explain(&e), false),
    };
    let mut client = IngestClient::new(channel).max_decoding_message_size(32 << 20);
    let (req_tx, req_rx) = mpsc::channel::<PushRequest>(4);
    let hello_msg = PushRequest { message: Some(push_request::Message::Hello(hello.clone())) };
    if req_tx.send(hello_msg).await.is_err() {
        return End::Broken("request stream closed".into(), false);
    }
    let mut responses = match client.push(ReceiverStream::new(req_rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return End::Broken(explain(&s), false),
    };
    let welcome = match tokio::time::timeout(Duration::from_secs(10), responses.message()).await {
        Ok(Ok(Some(m))) => match m.message {
            Some(push_response::Message::Welcome(w)) => w,
            _ => return End::Broken("collector did not answer with a Welcome".into(), false),
        },
        Ok(Ok(None)) => return End::Broken("collector closed the stream".into(), false),
        Ok(Err(s)) => return End::Broken(explain(&s), false),
        Err(_) => return End::Broken("no Welcome from the collector within 10s".into(), false),
    };
    queue.resume(welcome.resume_after);
    tracing::info!(resume_after = welcome.resume_after, version = %welcome.version, "connected to the collector");
    let mut req_tx = Some(req_tx);
    let mut stopping = false;
    let mut force = false;
    let mut deadline = None;
    let drain_deadline = tokio::time::sleep(Duration::from_hours(24));
    tokio::pin!(drain_deadline);
    loop {
        // Send every due batch, reading acknowledgements while the stream is full.
        if let Some(tx) = &req_tx {
            while queue.unsent() > 0 && (stopping || force || queue.unsent() >= batching.max_events)
            {
                tokio::select! {
                    permit = tx.reserve() => {
                        let Ok(permit) = permit else {
                            return End::Broken("request stream closed".into(), true);
                        };
                        let Some(out) = queue.take(batching.max_events) else { break };
                        permit.send(batch(&out, queue));
                    }
                    msg = responses.message() => if let Some(end) = on_response(queue, msg) {
                        return end;
                    },
                }
            }
            force = false;
            deadline = None;
            if stopping && queue.unsent() == 0 {
                // Close our side; the collector answers with its final acknowledgement.
                req_tx = None;
            }
        }
        tokio::select! {
            msg = responses.message() => {
                let end = on_response(queue, msg);
                if stopping && queue.is_drained() {
                    return End::Done;
                }
                if let Some(end) = end {
                    return end;
                }
            }
            more = batch_due(queue, batching, &mut deadline, stop), if !stopping => {
                if !more {
                    stopping = true;
                    drain_deadline.as_mut().reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                }
                force = true;
            }
            () = &mut drain_deadline, if stopping => return End::Done,
        }
    }
}

/// Handles one response; `Some` ends the session.
fn on_response(
    queue: &Queue,
    msg: Result<Option<hopwatch_proto::hopwatch::v1::PushResponse>, tonic::Status>,
) -> Option<End> {
    match msg {
        Ok(Some(m)) => {
            if let Some(push_response::Message::Ack(a)) = m.message {
                queue.ack(a.stored_through);
            }
            None
        }
        Ok(None) => Some(End::Broken("collector closed the stream".into(), true)),
        Err(s) => Some(End::Broken(explain(&s), true)),
    }
}
