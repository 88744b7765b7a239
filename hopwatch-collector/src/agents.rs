//! What the collector knows of each agent streaming to it: how far its sequence numbers were
//! accepted (ingest) and stored (the merge stage), which acknowledgements report. Ingest, the hub
//! and the merge stage all read it; it depends on none of them.

use tokio::sync::watch;

/// One agent's ingest progress.
#[derive(Debug)]
pub struct AgentState {
    pub id: String,
    pub node_name: String,
    /// Highest sequence number handed to the merge stage (duplicates at or below are dropped).
    pub(crate) accepted: tokio::sync::Mutex<u64>,
    /// Highest sequence number stored (what acknowledgements say).
    stored: watch::Sender<u64>,
}

impl AgentState {
    pub(crate) fn new(id: &str, node_name: &str, seq: u64) -> Self {
        Self {
            id: id.to_owned(),
            node_name: node_name.to_owned(),
            accepted: tokio::sync::Mutex::new(seq),
            stored: watch::channel(seq).0,
        }
    }

    pub fn stored_through(&self) -> u64 {
        *self.stored.borrow()
    }

    pub(crate) fn set_stored_through(&self, seq: u64) {
        self.stored.send_if_modified(|s| {
            let changed = seq > *s;
            *s = (*s).max(seq);
            changed
        });
    }

    pub fn watch_stored(&self) -> watch::Receiver<u64> {
        self.stored.subscribe()
    }

    pub async fn accepted_through(&self) -> u64 {
        *self.accepted.lock().await
    }
}
