//! The agent's link to a collector, in process (over `tokio::io::duplex`) and over TLS on
//! loopback.

mod link;
mod tls;

use hopwatch_collector::{hub::Hub, testing::*};
use hopwatch_proto::{flow::Verdict, observer::get_flows_response::ResponseTypes};
