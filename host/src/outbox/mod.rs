//! The PostgreSQL outbox relay: an application writes its business row and
//! an `outbox_events` row in one transaction; the relay publishes each
//! pending row to `HOOK_EVENTS` and marks it `published` after the PubAck,
//! so handlers consume it exactly like a webhook.
//!
//! # How a row travels
//!
//! A row is *due* when it is `pending`, its `next_attempt_at` has come, and
//! no earlier row of its aggregate (`aggregate_type`, `aggregate_id`) is
//! `failed` or waiting out a backoff. A round reads up to `batch` due rows
//! in `id` order and publishes each aggregate's rows one at a time — the
//! next only after the PubAck of the one before — with many aggregates at
//! once. The subject is `hook.<source>.<aggregate type>.<partition>.<aggregate
//! id>.<event type>`, tokens and partition as ingest computes them
//! ([`crate::subject::EventAddress`]); the headers are ingest's
//! ([`crate::headers::EventHeaders`]). The round's published rows are then
//! marked in one `UPDATE`; a failed publish counts an attempt and backs the
//! row off (exponential, with jitter) until `max_attempts` makes it
//! `failed`. A failed or backing-off row holds back its own aggregate's
//! later rows, nothing else.
//!
//! # One relay per table at a time
//!
//! Several processes may run a relay for the same table (every `serve`
//! with the same config, say); one of them relays and the others stand by.
//! The leader is whichever session holds the table's advisory lock
//! (`pg_try_advisory_lock`, taken on the very session that reads and marks
//! the rows); a standby tries again every `poll_interval` and takes over
//! when the leader's session ends — a crash closes its socket, and
//! PostgreSQL releases the lock with it. One reader walking the table in
//! `id` order is what keeps each aggregate in order without `SKIP LOCKED`
//! (which hands rows of one aggregate to two relays at once). Per-partition
//! locks would spread the work over processes, but the work is I/O-bound:
//! one relay keeps `AGGREGATES_IN_FLIGHT` publishes going at once, which is
//! what JetStream's own publish rate rewards, and failover needs no
//! rebalancing. Should a leader lose its session while a round is in
//! flight, the next leader republishes the round's unmarked rows: each
//! aggregate is still walked in `id` order by both, and the copies are
//! deduplicated (below).
//!
//! # Nothing lost, nothing doubled
//!
//! A row is marked only after its PubAck, so a crash, a database restart
//! or a NATS outage at any point leaves it `pending`, and it is published
//! (again) by the next round. The copy is dropped by the same two horizons
//! as a webhook's retry ([`crate::publish`]): the stream's duplicate window
//! on `Nats-Msg-Id` (the row's `idempotency_key`, else
//! `<source>:outbox:<id>`), and the `hook_idempotency` record written right
//! after the PubAck, for `idempotency_ttl`. Past both — a relay that died
//! between the PubAck and that record and whose row then stays unmarked
//! longer than the duplicate window, or a row unmarked for longer than
//! `idempotency_ttl` — the row is stored a second time.
//!
//! # Layout
//!
//! - [`table`]: the table's name and shape, the SQL of `outbox init`.
//! - [`db`]: the connection URL and a session that hears `NOTIFY`.
//! - [`queries`]: the relay's SQL.
//! - [`row`]: a row, the event it becomes, what a failed publish means.
//! - [`relay`]: the loop.
//! - [`health`], [`metrics`]: what `/readyz` and `/metrics` show.
//! - [`commands`]: `outbox init | relay | retry` as library calls;
//!   [`cli`]: their command line.

pub mod cli;
pub mod commands;
pub mod db;
pub mod health;
pub mod metrics;
pub mod queries;
pub mod relay;
pub mod row;
pub mod table;

pub use health::Health;
pub use relay::Relay;
