//! hopwatch's userspace: the agent pipeline, its parsers and its wire types. The `hopwatch`
//! binary (`main.rs`) is a thin command-line front end over this library.

pub mod agent;
pub mod cli;
pub mod collector;
pub mod conntrack;
pub mod drops;
pub mod events;
pub mod flow;
pub mod hops;
pub mod hops_cli;
pub mod identity;
pub mod l7;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod proto;
pub mod protocols;
pub mod replay;
pub mod sink;
pub mod tls;

/// `error: cause: cause...` on one line, skipping causes the message already contains.
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
