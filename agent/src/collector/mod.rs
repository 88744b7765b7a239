//! The collector: agents stream flows in (`hopwatch.v1.Ingest`), it keeps them (memory ring +
//! on-disk history) and serves Hubble's `observer.Observer` API over them.

pub mod filter;
pub mod store;
