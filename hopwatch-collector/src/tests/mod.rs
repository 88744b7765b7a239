//! In-process tests of the collector's gRPC services (over `tokio::io::duplex`, no ports).

mod grpc;
mod traces;

use hopwatch_proto::{
    flow::Verdict,
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
};

use crate::testing::*;
