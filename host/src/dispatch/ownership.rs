//! Partition ownership: at most one host works a handler's partition at a
//! time, and the partitions spread evenly over the live hosts of the
//! handler — the unit of ownership, as in Kafka, not of parallelism.
//!
//! Everything lives in the KV bucket `hook_leases`:
//! - `<handler>.member.<host>`: a host running the handler, renewed every
//!   [`TICK`] and live until its `until`;
//! - `<handler>.partition.<n>`: the lease of partition `n` — its holder, and
//!   until when the lease holds.
//!
//! Each host computes the same assignment from the live members (sorted,
//! partition `n` to member `n mod count`), takes the free partitions that
//! are its own, renews what it holds, and hands over what is not its own
//! any more. Every write is a compare-and-set on the record's revision, so
//! two hosts never both believe they hold a partition.
//!
//! A handover never lets an entity's later event run before its earlier
//! one:
//! - a host that hands a partition over stops taking events, finishes the
//!   events it runs, returns the rest to the server (a nak the server
//!   confirms, oldest first, so they are redelivered first and in order)
//!   and only then deletes its lease;
//! - a host that died held its events unacked: the new holder takes the
//!   expired lease but pulls only once `ack_wait` has passed since the old
//!   lease ran out — by then the server redelivers every event the dead
//!   host held, before any later one;
//! - a host that cannot renew stops starting events before its lease runs
//!   out (the [`Fence`]), so a slow or cut-off host fences itself, and
//!   stops keeping its running events from redelivery;
//! - deliveries lost without a host dying (a forgotten pull request, a
//!   consumer leader lost) are waited for by the owner's recount (see
//!   `recount`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::extract::kv_key;

/// How often a host renews its member record and leases and looks at the
/// assignment again.
pub const TICK: Duration = Duration::from_secs(1);

/// How long a member record or lease holds without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(4);

/// A holder stops starting events this long before its lease runs out.
const FENCE_MARGIN: Duration = Duration::from_millis(1500);

/// After a dead holder's lease ran out, this long on top of `ack_wait`
/// before the new holder pulls (clock skew between hosts, delivery).
const TAKEOVER_MARGIN: Duration = Duration::from_secs(1);

/// A partition lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The holding host.
    pub host: String,
    /// Until when (Unix milliseconds) it holds without renewal.
    pub until: u64,
}

/// A member record: a host running the handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The host.
    pub host: String,
    /// Until when (Unix milliseconds) it counts as live.
    pub until: u64,
}

/// The lease key of a handler partition.
pub fn lease_key(handler: &str, partition: u32) -> String {
    format!("{}.partition.{partition}", kv_key(handler))
}

/// The member key of a host of a handler.
pub fn member_key(handler: &str, host: &str) -> String {
    format!("{}.member.{}", kv_key(handler), kv_key(host))
}

/// The hosts working any handler now: the live member records in
/// `leases` (a host that stopped cleanly has deleted its record; one that
/// died counts until its record runs out, [`LEASE_TTL`]).
pub async fn live_hosts(leases: &kv::Store) -> Result<Vec<String>, async_nats::Error> {
    let keys: Vec<String> = leases.keys().await?.try_collect().await?;
    let now = now_ms();
    let mut hosts = Vec::new();
    for key in keys.iter().filter(|k| k.contains(".member.")) {
        if let Some(value) = leases.get(key).await?
            && let Ok(member) = serde_json::from_slice::<Member>(&value)
            && member.until > now
            && !hosts.contains(&member.host)
        {
            hosts.push(member.host);
        }
    }
    Ok(hosts)
}

/// The owner of every partition, given the live members: partition `n` to
/// the `n mod count`-th member in name order. Every host computes the same.
pub fn assign(members: &[String], partitions: u32) -> Vec<Option<String>> {
    let mut sorted: Vec<&String> = members.iter().collect();
    sorted.sort();
    sorted.dedup();
    (0..partitions)
        .map(|p| (!sorted.is_empty()).then(|| sorted[p as usize % sorted.len()].clone()))
        .collect()
}

/// Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a partition worker checks before it starts an event: whether its
/// lease still holds (with a margin), and whether it is asked to hand the
/// partition over.
#[derive(Debug)]
pub struct Fence {
    valid_until: AtomicU64,
    stop: watch::Sender<bool>,
    /// Set by the worker when it ends with every event it had settled or
    /// confirmed back on the server: only then may the lease go at once.
    returned_all: AtomicBool,
}

impl Fence {
    /// The fence of a lease that holds until `lease_until` (Unix
    /// milliseconds).
    pub(crate) fn new(lease_until: u64) -> Arc<Fence> {
        let fence = Arc::new(Fence {
            valid_until: AtomicU64::new(0),
            stop: watch::Sender::new(false),
            returned_all: AtomicBool::new(false),
        });
        fence.extend(lease_until);
        fence
    }

    /// A fence that always holds (a worker without ownership: tests, tools).
    pub fn unfenced() -> Arc<Fence> {
        Fence::new(u64::MAX)
    }

    fn extend(&self, lease_until: u64) {
        self.valid_until.store(
            lease_until.saturating_sub(ms(FENCE_MARGIN)),
            Ordering::Relaxed,
        );
    }

    fn revoke(&self) {
        self.valid_until.store(0, Ordering::Relaxed);
        self.stop.send_replace(true);
    }

    /// Whether the lease may have run out (or was taken away): from here
    /// on another host may take the partition over once `ack_wait` has
    /// passed, so events in hand must not be kept from redelivery.
    pub fn lapsed(&self) -> bool {
        now_ms() >= self.valid_until.load(Ordering::Relaxed)
    }

    /// Whether the worker may start an event now.
    pub fn holds(&self) -> bool {
        !*self.stop.borrow() && now_ms() < self.valid_until.load(Ordering::Relaxed)
    }

    /// Resolves once the worker is asked to hand over or its lease lapsed
    /// (checked at least every [`TICK`]).
    pub async fn lost(&self) {
        let mut stop = self.stop.subscribe();
        loop {
            if !self.holds() {
                return;
            }
            let _ = tokio::time::timeout(TICK, stop.changed()).await;
        }
    }

    /// Asks the worker to hand the partition over.
    fn hand_over(&self) {
        self.stop.send_replace(true);
    }

    /// The worker ends with nothing of the partition's left unconfirmed:
    /// every event it took is acked, or back on the server by a nak the
    /// server confirmed.
    pub fn mark_returned_all(&self) {
        self.returned_all.store(true, Ordering::Relaxed);
    }

    /// Whether the worker ended so ([`mark_returned_all`](Self::mark_returned_all)).
    pub fn returned_all(&self) -> bool {
        self.returned_all.load(Ordering::Relaxed)
    }
}

/// Starts a worker for one owned partition: it runs until its fence is
/// lost, then returns the events it did not finish to the server.
pub trait StartWorker: Send + Sync + 'static {
    /// Starts the worker of `partition`; it may pull from `start_at` on.
    fn start(
        &self,
        partition: u32,
        fence: Arc<Fence>,
        start_at: tokio::time::Instant,
    ) -> JoinHandle<()>;
}

/// What a lease write for a free partition came to.
enum Claim {
    /// Another host's live lease: it hands the partition over first.
    Live,
    /// The write failed; `conflict` when the record is not what this host
    /// remembers.
    Refused { conflict: bool, error: String },
    /// This host's lease now, at `revision`, over the `previous` record.
    Taken {
        lease: Lease,
        revision: u64,
        previous: Option<Lease>,
    },
}

struct Held {
    revision: u64,
    until: u64,
    fence: Arc<Fence>,
    worker: JoinHandle<()>,
    handing_over: bool,
}

/// One host's share of one handler's partitions.
pub struct Ownership<W> {
    leases: kv::Store,
    handler: String,
    host: String,
    partitions: u32,
    ack_wait: Box<dyn Fn() -> Duration + Send + Sync>,
    workers: W,
    members: BTreeMap<String, (Member, u64)>,
    lease_records: BTreeMap<u32, (Option<Lease>, u64)>,
    held: BTreeMap<u32, Held>,
    owned_gauge: Box<dyn Fn(usize) + Send + Sync>,
}

impl<W: StartWorker> Ownership<W> {
    /// The ownership of `handler`'s partitions by `host`; `ack_wait` reads
    /// the handler's current ack wait, `owned` reports how many partitions
    /// this host holds.
    pub fn new(
        leases: kv::Store,
        handler: &str,
        host: &str,
        partitions: u32,
        ack_wait: impl Fn() -> Duration + Send + Sync + 'static,
        workers: W,
        owned: impl Fn(usize) + Send + Sync + 'static,
    ) -> Self {
        Ownership {
            leases,
            handler: handler.to_string(),
            host: host.to_string(),
            partitions,
            ack_wait: Box::new(ack_wait),
            workers,
            members: BTreeMap::new(),
            lease_records: BTreeMap::new(),
            held: BTreeMap::new(),
            owned_gauge: Box::new(owned),
        }
    }

    /// Takes, renews and hands over partitions until `shutdown`, then
    /// hands every partition over and leaves.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let filter = format!("{}.>", kv_key(&self.handler));
        let mut retry = crate::retry::Retry::default();
        'watch: while !*shutdown.borrow() {
            let mut changes = match self.leases.watch_with_history(&filter).await {
                Ok(changes) => changes,
                Err(error) => {
                    warn!(handler = %self.handler, %error, retry_in = ?retry.delay(), "cannot watch partition leases");
                    self.check_workers().await;
                    retry.pause(&mut shutdown).await;
                    continue;
                }
            };
            retry.reset();
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break 'watch,
                    change = changes.next() => match change {
                        Some(Ok(entry)) => {
                            self.observe(entry);
                            continue;
                        }
                        _ => {
                            debug!(handler = %self.handler, "lease watch interrupted");
                            retry.wait(&mut shutdown).await;
                            continue 'watch;
                        }
                    },
                    _ = tick.tick() => {}
                }
                self.step().await;
            }
        }
        self.leave().await;
    }

    /// Takes in one change of the bucket.
    fn observe(&mut self, entry: kv::Entry) {
        let prefix = format!("{}.", kv_key(&self.handler));
        let Some(rest) = entry.key.strip_prefix(&prefix) else {
            return;
        };
        let put = entry.operation == Operation::Put;
        if let Some(p) = rest.strip_prefix("partition.") {
            let Ok(p) = p.parse::<u32>() else { return };
            let lease = put
                .then(|| serde_json::from_slice::<Lease>(&entry.value).ok())
                .flatten();
            self.lease_records.insert(p, (lease, entry.revision));
        } else if rest.starts_with("member.") {
            match put
                .then(|| serde_json::from_slice::<Member>(&entry.value).ok())
                .flatten()
            {
                Some(member) => {
                    self.members
                        .insert(entry.key.clone(), (member, entry.revision));
                }
                None => {
                    self.members.remove(&entry.key);
                }
            }
        }
    }

    /// One round: renew, hand over, take.
    async fn step(&mut self) {
        let now = now_ms();
        let me = Member {
            host: self.host.clone(),
            until: now + ms(LEASE_TTL),
        };
        if let Ok(value) = serde_json::to_vec(&me) {
            let key = member_key(&self.handler, &self.host);
            match self.leases.put(&key, Bytes::from(value)).await {
                Ok(revision) => {
                    self.members.insert(key, (me, revision));
                }
                Err(error) => debug!(handler = %self.handler, %error, "member record not renewed"),
            }
        }
        let live: Vec<String> = self
            .members
            .values()
            .filter(|(m, _)| m.until > now)
            .map(|(m, _)| m.host.clone())
            .collect();
        let desired = assign(&live, self.partitions);
        self.check_workers().await;
        let mut free = Vec::new();
        for p in 0..self.partitions {
            let mine = desired[p as usize].as_deref() == Some(self.host.as_str());
            if self.held.contains_key(&p) {
                if !mine {
                    self.hand_over(p);
                }
                self.renew(p).await;
            } else if mine {
                free.push(p);
            }
        }
        self.take(free, now).await;
        (self.owned_gauge)(self.held.len());
    }

    /// Notices workers that stopped: handed over (the lease is deleted) or
    /// fenced.
    async fn check_workers(&mut self) {
        let finished: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| h.worker.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in finished {
            let Some(held) = self.held.remove(&p) else {
                continue;
            };
            if !held.fence.returned_all() {
                // Some event may still be out unacked (a nak the server did
                // not confirm, acks not flushed): the lease runs out, and
                // the next holder waits `ack_wait` past it for the server
                // to hand those out again, before any later event.
                warn!(handler = %self.handler, partition = p, "partition released without every event confirmed back; its lease runs out instead of going now");
                continue;
            }
            // Every event of the partition is settled or back on the
            // server: the next holder may pull at once.
            let key = lease_key(&self.handler, p);
            match self
                .leases
                .delete_expect_revision(&key, Some(held.revision))
                .await
            {
                Ok(()) => info!(handler = %self.handler, partition = p, "partition handed over"),
                Err(error) => {
                    debug!(handler = %self.handler, partition = p, %error, "lease not deleted (it runs out by itself)");
                    self.refresh(p).await;
                }
            }
        }
    }

    /// Reads partition `p`'s lease record again after a write to it failed.
    ///
    /// The record this host remembers comes from the watch and its own
    /// writes; a write that timed out may still have been stored (a
    /// cluster that lost its quorum applies it when the quorum returns), so
    /// the remembered revision is behind and every compare-and-set on it
    /// fails. Without a fresh read the host would never take that
    /// partition again — and, renewing its member record, keep every other
    /// host from taking it too.
    async fn refresh(&mut self, p: u32) {
        let key = lease_key(&self.handler, p);
        match self.leases.entry(&key).await {
            Ok(Some(entry)) => {
                let lease = (entry.operation == Operation::Put)
                    .then(|| serde_json::from_slice::<Lease>(&entry.value).ok())
                    .flatten();
                self.lease_records.insert(p, (lease, entry.revision));
            }
            Ok(None) => {
                self.lease_records.remove(&p);
            }
            Err(error) => {
                debug!(handler = %self.handler, partition = p, %error, "lease record not read again");
            }
        }
    }

    fn hand_over(&mut self, p: u32) {
        if let Some(held) = self.held.get_mut(&p)
            && !held.handing_over
        {
            held.handing_over = true;
            held.fence.hand_over();
            debug!(handler = %self.handler, partition = p, "handing the partition over");
        }
    }

    async fn renew(&mut self, p: u32) {
        let Some(held) = self.held.get_mut(&p) else {
            return;
        };
        let Some((lease, value)) = own_lease(&self.host, now_ms()) else {
            return;
        };
        let until = lease.until;
        let key = lease_key(&self.handler, p);
        match self.leases.update(&key, value, held.revision).await {
            Ok(revision) => {
                held.revision = revision;
                held.until = until;
                held.fence.extend(until);
                self.lease_records.insert(p, (Some(lease), revision));
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // A renewal that timed out may have been stored after all:
                // then the record is still this host's, at a later revision.
                self.refresh(p).await;
                let Some(held) = self.held.get_mut(&p) else {
                    return;
                };
                match self.lease_records.get(&p) {
                    Some((Some(lease), revision)) if lease.host == self.host => {
                        debug!(handler = %self.handler, partition = p, revision, "a renewal that timed out was stored; renewing from it");
                        held.revision = *revision;
                    }
                    _ => {
                        warn!(handler = %self.handler, partition = p, "the partition lease changed hands; this host stops working it");
                        held.fence.revoke();
                    }
                }
            }
            Err(error) => {
                // The fence runs out by itself if this goes on.
                debug!(handler = %self.handler, partition = p, %error, lease_until = held.until, "lease not renewed");
            }
        }
    }

    /// Takes the partitions `free` that are this host's: the lease writes go
    /// out together (a host starting, or taking over from one that left,
    /// does not wait for one round trip per partition before the last one
    /// works), then each partition taken starts.
    async fn take(&mut self, free: Vec<u32>, now: u64) {
        let this = &*self;
        let claims = futures::future::join_all(free.iter().map(|&p| this.claim(p, now))).await;
        for (p, claim) in free.into_iter().zip(claims) {
            match claim {
                Claim::Live => {}
                Claim::Refused { conflict, error } => {
                    debug!(handler = %self.handler, partition = p, %error, "partition not taken (another host was quicker)");
                    if conflict {
                        self.refresh(p).await;
                    }
                }
                Claim::Taken {
                    lease,
                    revision,
                    previous,
                } => self.start_taken(p, lease, revision, previous),
            }
        }
    }

    /// Writes this host's lease of partition `p`, if the record allows.
    async fn claim(&self, p: u32, now: u64) -> Claim {
        let (previous, revision) = match self.lease_records.get(&p) {
            Some((lease, revision)) => (lease.clone(), Some(*revision)),
            None => (None, None),
        };
        if let Some(lease) = &previous
            && lease.until > now
        {
            // Live, held by another host that will hand it over.
            return Claim::Live;
        }
        let Some((lease, value)) = own_lease(&self.host, now) else {
            return Claim::Refused {
                conflict: false,
                error: "the lease record could not be encoded".into(),
            };
        };
        let key = lease_key(&self.handler, p);
        // A failed write says whether the record differs from what this
        // host remembers (`conflict`): only then is it read again — a
        // timeout during an outage must not cost a second round trip.
        let written = match (&previous, revision) {
            (Some(_), Some(revision)) => {
                self.leases
                    .update(&key, value, revision)
                    .await
                    .map_err(|e| {
                        let conflict = e.kind() == kv::UpdateErrorKind::WrongLastRevision;
                        (conflict, e.to_string())
                    })
            }
            _ => self.leases.create(&key, value).await.map_err(|e| {
                let conflict = e.kind() == kv::CreateErrorKind::AlreadyExists;
                (conflict, e.to_string())
            }),
        };
        match written {
            Ok(revision) => Claim::Taken {
                lease,
                revision,
                previous,
            },
            Err((conflict, error)) => Claim::Refused { conflict, error },
        }
    }

    /// Starts the worker of partition `p`, whose lease this host has just
    /// written over `previous`.
    fn start_taken(&mut self, p: u32, lease: Lease, revision: u64, previous: Option<Lease>) {
        let until = lease.until;
        self.lease_records.insert(p, (Some(lease), revision));
        // A holder that died left events unacked: wait until the server
        // hands them out again, so none is overtaken by a later one.
        let start_at = match &previous {
            Some(dead) => {
                let ready = dead.until + ms((self.ack_wait)() + TAKEOVER_MARGIN);
                let wait = Duration::from_millis(ready.saturating_sub(now_ms()));
                info!(handler = %self.handler, partition = p, previous = %dead.host, pulls_in = ?wait, "took over the partition of a host that stopped renewing");
                tokio::time::Instant::now() + wait
            }
            None => {
                info!(handler = %self.handler, partition = p, "took the partition");
                tokio::time::Instant::now()
            }
        };
        let fence = Fence::new(until);
        let worker = self.workers.start(p, fence.clone(), start_at);
        self.held.insert(
            p,
            Held {
                revision,
                until,
                fence,
                worker,
                handing_over: false,
            },
        );
    }

    /// Hands every partition over and removes the member record.
    async fn leave(mut self) {
        for held in self.held.values_mut() {
            held.handing_over = true;
            held.fence.hand_over();
        }
        // Keep the leases while the workers finish their events in hand:
        // a finished worker's partition is released within 50 ms, and a
        // lease is renewed on its usual cadence (not on every look, which
        // would write every lease 20 times a second while the open pulls
        // run out).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.held.is_empty() && tokio::time::Instant::now() < deadline {
            self.check_workers().await;
            if self.held.is_empty() {
                break;
            }
            let due = now_ms() + ms(LEASE_TTL.saturating_sub(TICK));
            let partitions: Vec<u32> = self
                .held
                .iter()
                .filter(|(_, held)| held.until <= due)
                .map(|(p, _)| *p)
                .collect();
            for p in partitions {
                self.renew(p).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let key = member_key(&self.handler, &self.host);
        if let Err(error) = self.leases.delete(&key).await {
            debug!(handler = %self.handler, %error, "member record not deleted (it runs out by itself)");
        }
        (self.owned_gauge)(0);
    }
}

/// A lease for `host` from `now` (Unix ms), and its encoded value.
fn own_lease(host: &str, now: u64) -> Option<(Lease, Bytes)> {
    let lease = Lease {
        host: host.to_string(),
        until: now + ms(LEASE_TTL),
    };
    let value = serde_json::to_vec(&lease).ok()?;
    Some((lease, Bytes::from(value)))
}

/// Reads who holds each partition of `handler` (for `handlers show`):
/// partition → the lease, `None` for a partition nobody holds.
pub async fn owners(
    leases: &kv::Store,
    handler: &str,
    partitions: u32,
) -> Result<Vec<(u32, Option<Lease>)>, kv::EntryError> {
    let mut out = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        let lease = leases
            .get(lease_key(handler, p))
            .await?
            .and_then(|value| serde_json::from_slice::<Lease>(&value).ok());
        out.push((p, lease));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_evenly_and_every_host_computes_the_same() {
        let a = assign(&["b".into(), "a".into()], 16);
        let b = assign(&["a".into(), "b".into(), "a".into()], 16);
        assert_eq!(a, b);
        let count = |who: &str| a.iter().filter(|o| o.as_deref() == Some(who)).count();
        assert_eq!((count("a"), count("b")), (8, 8));
        let three = assign(&["a".into(), "b".into(), "c".into()], 16);
        let counts: Vec<usize> = ["a", "b", "c"]
            .iter()
            .map(|w| three.iter().filter(|o| o.as_deref() == Some(*w)).count())
            .collect();
        assert_eq!(counts, vec![6, 5, 5]);
        assert!(assign(&[], 4).iter().all(Option::is_none));
    }

    #[test]
    fn keys_are_readable_with_the_nats_cli() {
        assert_eq!(lease_key("order-sync", 7), "order-sync.partition.7");
        assert_eq!(
            member_key("order-sync", "web-1:42:0190"),
            "order-sync.member.web-1=3A42=3A0190"
        );
    }

    /// A worker that works until its fence is lost.
    struct UntilLost;

    impl StartWorker for UntilLost {
        fn start(&self, _: u32, fence: Arc<Fence>, _: tokio::time::Instant) -> JoinHandle<()> {
            tokio::spawn(async move {
                fence.lost().await;
                fence.mark_returned_all();
            })
        }
    }

    async fn leases() -> (hookmesh_test_support::NatsServer, kv::Store) {
        let nats = hookmesh_test_support::NatsServer::start().expect("nats-server");
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let defaults = crate::config::Config::from_toml(
            "",
            crate::config::Origin::Builtin,
            &crate::config::Env::default(),
        )
        .expect("the built-in config");
        crate::streams::apply(&js, &defaults.ingest, crate::streams::Mode::Update)
            .await
            .expect("streams");
        let store = js
            .get_key_value(crate::streams::LEASES_BUCKET)
            .await
            .expect("bucket");
        (nats, store)
    }

    fn ownership(store: &kv::Store) -> Ownership<UntilLost> {
        Ownership::new(
            store.clone(),
            "h",
            "host-a",
            1,
            || Duration::from_millis(100),
            UntilLost,
            |_| {},
        )
    }

    fn lease_value(host: &str, until: u64) -> Bytes {
        Bytes::from(
            serde_json::to_vec(&Lease {
                host: host.into(),
                until,
            })
            .expect("json"),
        )
    }

    /// A worker that takes the given time to hand its partition back once
    /// told to (an open pull running out, events in hand finishing).
    struct SlowHandBack(Duration);

    impl StartWorker for SlowHandBack {
        fn start(&self, _: u32, fence: Arc<Fence>, _: tokio::time::Instant) -> JoinHandle<()> {
            let takes = self.0;
            tokio::spawn(async move {
                fence.lost().await;
                tokio::time::sleep(takes).await;
                fence.mark_returned_all();
            })
        }
    }

    #[tokio::test]
    async fn a_host_leaving_renews_its_leases_on_their_cadence_while_its_workers_finish() {
        let (nats, store) = leases().await;
        let js =
            async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
        let writes = || async {
            js.get_stream(format!("KV_{}", crate::streams::LEASES_BUCKET))
                .await
                .expect("bucket stream")
                .info()
                .await
                .expect("info")
                .state
                .last_sequence
        };
        let mut own = Ownership::new(
            store.clone(),
            "h",
            "host-a",
            4,
            || Duration::from_millis(100),
            SlowHandBack(Duration::from_millis(2200)),
            |_| {},
        );
        own.step().await;
        assert_eq!(own.held.len(), 4, "took the free partitions");
        let before = writes().await;
        let started = std::time::Instant::now();
        own.leave().await;
        assert!(
            started.elapsed() >= Duration::from_millis(2200),
            "waited for the workers"
        );
        // Four releases and the member record's deletion; the rest are
        // renewals, due once a second: two per partition in 2.2 s (one
        // more at most, at the edges), none would let a longer handover
        // outlive its leases.
        let renewals = writes().await - before - (4 + 1);
        assert!(
            (4..=12).contains(&renewals),
            "{renewals} lease renewals while leaving 4 partitions for 2.2 s"
        );
        for p in 0..4 {
            let lease = store.get(lease_key("h", p)).await.expect("read");
            assert!(
                lease.is_none_or(|value| serde_json::from_slice::<Lease>(&value).is_err()),
                "partition {p} released"
            );
        }
    }

    #[tokio::test]
    async fn a_renewal_stored_after_it_timed_out_keeps_the_partition() {
        let (_nats, store) = leases().await;
        let mut own = ownership(&store);
        own.step().await;
        assert!(own.held.contains_key(&0), "took the free partition");
        // A renewal the host gave up on, stored when the quorum returned:
        // the record is still the host's, at a revision it does not know.
        let stored = store
            .put(lease_key("h", 0), lease_value("host-a", now_ms() + 4_000))
            .await
            .expect("put");
        own.step().await;
        let held = own.held.get(&0).expect("still held");
        assert_eq!(held.revision, stored, "the stored revision adopted");
        assert!(held.fence.holds());
        own.step().await;
        let held = own.held.get(&0).expect("still held");
        assert!(held.revision > stored, "renewed from it");
    }

    #[tokio::test]
    async fn a_stale_remembered_revision_does_not_lock_the_partition_out() {
        let (_nats, store) = leases().await;
        let key = lease_key("h", 0);
        let first = store
            .put(&key, lease_value("host-a", now_ms() - 10_000))
            .await
            .expect("put");
        // Stored behind the host's back after what it remembers.
        store
            .put(&key, lease_value("host-a", now_ms() - 5_000))
            .await
            .expect("put");
        let mut own = ownership(&store);
        let remembered = Lease {
            host: "host-a".into(),
            until: now_ms() - 10_000,
        };
        own.lease_records.insert(0, (Some(remembered), first));
        own.step().await;
        assert!(
            !own.held.contains_key(&0),
            "the write on the old revision fails"
        );
        own.step().await;
        assert!(
            own.held.contains_key(&0),
            "the record read again, the expired lease is taken"
        );
    }

    #[test]
    fn a_fence_holds_until_shortly_before_the_lease_runs_out() {
        let fence = Fence::new(now_ms() + 10_000);
        assert!(fence.holds());
        fence.extend(now_ms() + 1_000);
        assert!(!fence.holds(), "within the margin");
        fence.extend(now_ms() + 10_000);
        assert!(fence.holds());
        fence.hand_over();
        assert!(!fence.holds());
        assert!(Fence::unfenced().holds());
    }
}
