//! Privileged end-to-end tests: the real agent binary, real kernel hooks, real peer processes in
//! network namespaces this test creates. Each test asserts what a user would see in
//! `hopwatch agent -o json`. Run as root, serially (`cargo xtask test` does both).
#![allow(
    unused_crate_dependencies,
    reason = "a test or bench target links every dependency of the package; the lint is for the library"
)]

mod support;

mod deploy_mtls;
mod drops;
mod exchange_engine;
mod hardening;
mod identity;
mod l7;
mod lifecycle;
mod metrics;
mod own_traffic;
mod sampling;
mod server_errors;
mod tcp;
mod tls_handshake;
mod topology;
mod tracing;
mod ui;
