//! End-to-end tests: a real nats-server per test, the real host, real HTTP.
//!
//! The suite runs once against the machine's nats-server and once against a
//! pinned current release (`NATS_SERVER_BIN`); see `scripts/test.sh`. The
//! `outbox::` tests (which also need PostgreSQL) do not depend on the
//! server's version and run in the first pass only.

mod support;

mod cluster;
mod deploy;
mod dlq;
mod edge;
mod erp;
mod guest_limits;
mod handlers;
mod ingest;
mod live_deploy;
mod observe;
mod ordering;
mod outage;
mod outbound;
mod outbox;
mod ownership;
mod processes;
mod runtime;
mod security;
mod soak;
mod streams;
mod traces;
