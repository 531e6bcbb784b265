//! hookmesh: signed webhooks into NATS JetStream — verified, deduplicated,
//! durable — for sandboxed handlers to process in per-entity order.
//!
//! # Layout
//!
//! Data flows one way: HTTP request → [`verify`] → [`extract`] → [`publish`]
//! → `HOOK_EVENTS`. Each module has one job:
//!
//! - [`config`]: the typed `hookmesh.toml`, environment overrides, validation.
//! - [`verify`]: pure signature verification (and signing) per scheme.
//! - [`extract`]: event id, type, domain, entity and version out of a
//!   request; the idempotency key.
//! - [`subject`]: subject layout, reversible token encoding, partitions.
//! - [`streams`]: stream and bucket definitions (`nats/streams/*.json`) and
//!   applying them.
//! - [`headers`]: the message headers hookmesh writes and reads.
//! - [`publish`]: storing an event exactly once (KV + `Nats-Msg-Id`).
//! - [`ingress`]: the HTTP API providers reach, and its answers.
//! - [`admin`]: the admin listener — `/metrics`, health, and the operator
//!   console (token-guarded replay and purge).
//! - [`dispatch`]: handlers run from durable per-partition consumers:
//!   partition ownership, per-entity order with entity isolation, the
//!   settle policy, emits.
//! - [`dlq`]: dead letters — the advisory-driven writer, replay and purge.
//! - [`records`]: what dispatch and dead letters share in `hook_attempts`:
//!   attempt records and held or parked entities.
//! - [`metrics`]: Prometheus metrics.
//! - [`logging`]: the log, human or JSON lines (`[log] format`).
//! - [`telemetry`]: OpenTelemetry traces over OTLP/HTTP (`[telemetry]`),
//!   one trace per webhook across NATS via the `traceparent` header.
//! - [`nats`]: connecting as configured.
//! - [`retry`]: the growing pause of every loop waiting for NATS.
//! - [`server`]: running the host and stopping it cleanly.
//! - [`manifest`]: handler manifests (`handler.toml`).
//! - [`runtime`]: running handler components in wasmtime, sandboxed; their
//!   outgoing HTTP, granted by the manifest (`runtime::http`).
//! - [`local`]: the development NATS server that `hookmesh up` starts.
//! - [`mock_erp`]: the mock ERP that `hookmesh up` starts for the example
//!   handlers to write to.
//! - [`send`]: signing and POSTing a test webhook (`hookmesh send`).
//! - [`deploy`]: handler versions in KV/object store `hook_handlers`:
//!   validating components, deploy, rollback, remove, watching.
//! - [`audit`]: the `HOOK_AUDIT` trail of deploys, rollbacks, replays, purges.
//! - [`status`]: the installation's state read from NATS in one typed
//!   snapshot (`hookmesh status`, the console), and the backlog gauges.
//! - [`outbox`]: the PostgreSQL outbox relay — an application's
//!   `outbox_events` rows into `HOOK_EVENTS`, per aggregate in order.
//! - [`cli`]: the `hookmesh` command line, a thin face over the above.

#![deny(missing_docs)]

pub mod admin;
pub mod audit;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod dispatch;
pub mod dlq;
pub mod edge;
pub mod extract;
pub mod headers;
pub mod ingress;
pub mod local;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod mock_erp;
pub mod nats;
pub mod outbox;
pub mod publish;
pub mod records;
pub mod retry;
pub mod runtime;
pub mod send;
pub mod server;
pub mod status;
pub mod streams;
pub mod subject;
pub mod telemetry;
pub mod verify;
