//! The agent and the servers it traces, restarted.
