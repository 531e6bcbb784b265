//! The soak: for `SOAK_SECONDS` (default 60) providers post webhooks to
//! two `hookmesh serve` hosts, retrying as providers do (on any non-2xx
//! answer or transport error, with backoff, to whichever host is up),
//! while one host after the other is killed with SIGKILL every few seconds
//! and started again. order-sync runs on both and writes to the mock ERP.
//! At the end: every event got a 2xx, every event is stored exactly once,
//! handled exactly once (one emit each), and made exactly one ERP effect
//! (one non-replayed ERP answer per idempotency key, one sales order per
//! order).
//!
//! The long run (figures in the operations guide):
//!
//! ```sh
//! SOAK_SECONDS=600 cargo nextest run -p hookmesh-e2e -E 'test(/soak/)' --no-capture
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hookmesh::send::Signed;
use hookmesh_mock_erp::MockErp;
use hookmesh_test_support::NatsServer;
use serde_json::json;

use crate::handlers::messages;
use crate::support::*;

/// Events posted per second, across the senders.
const RATE: u64 = 20;
/// Events in flight at once (providers' delivery workers).
const SENDERS: usize = 8;
/// Time between two kills.
const KILL_EVERY: Duration = Duration::from_secs(4);

fn order(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": "order.created",
        "data": {"id": id, "version": 1, "total": "10.00", "currency": "EUR",
                 "customer": {"id": "CUST-1", "payment_terms": "NET30"}}
    }))
    .expect("json")
}

/// The hosts' current webhook addresses (a restarted host listens on a new
/// port); empty slots are hosts being restarted.
type Addresses = Arc<Mutex<Vec<Option<String>>>>;

/// Delivers one event as a provider does: until a 2xx, backing off from
/// 50 ms to 2 s, trying the hosts in turn. Returns the attempts it took.
async fn deliver(http: &reqwest::Client, addresses: &Addresses, signed: &Signed) -> u64 {
    let mut delay = Duration::from_millis(50);
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let target = {
            let live: Vec<String> = addresses
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .flatten()
                .cloned()
                .collect();
            (!live.is_empty()).then(|| live[attempts as usize % live.len()].clone())
        };
        if let Some(address) = target {
            let answer = http
                .post(format!("http://{address}/webhooks/crm"))
                .headers(signed.headers.clone())
                .body(signed.body.clone())
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            if answer.is_ok_and(|a| a.status().is_success()) {
                return attempts;
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

fn soak_seconds() -> u64 {
    std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_hosts_killed_every_few_seconds_lose_and_double_nothing() {
    let duration = Duration::from_secs(soak_seconds());
    let nats = NatsServer::start().expect("nats");
    let erp = MockErp::start("127.0.0.1:0").await.expect("mock ERP");
    let dir = ServeDir::new(
        &nats.url(),
        "order-sync",
        &crate::erp::order_sync_manifest(&erp.url()),
    );
    let args = dir.serve_args();
    let mut hosts = [
        LoggedProcess::start(dir.path(), &args, "host-a-0").await,
        LoggedProcess::start(dir.path(), &args, "host-b-0").await,
    ];
    let addresses: Addresses = Arc::new(Mutex::new(
        hosts.iter().map(|h| Some(h.address.clone())).collect(),
    ));
    let config = hookmesh::config::Config::from_toml(
        &config_toml(&nats.url(), &Options::default()),
        hookmesh::config::Origin::Builtin,
        &hookmesh::config::Env::default(),
    )
    .expect("config");
    let crm = config.providers["crm"].clone();

    // The providers: one event every 1/RATE s, each delivered until a 2xx.
    let stop = Arc::new(AtomicBool::new(false));
    let retried = Arc::new(AtomicU64::new(0));
    let http = reqwest::Client::new();
    let providers = {
        let (stop, retried) = (stop.clone(), retried.clone());
        let addresses = addresses.clone();
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(SENDERS));
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            let mut deliveries = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let signed = hookmesh::send::prepare(
                    &crm,
                    order(&format!("ORD-{i}")),
                    None,
                    Some(&format!("soak-{i}")),
                    SystemTime::now(),
                )
                .expect("sign");
                let (http, addresses, retried) = (http.clone(), addresses.clone(), retried.clone());
                deliveries.push(tokio::spawn(async move {
                    let attempts = deliver(&http, &addresses, &signed).await;
                    retried.fetch_add(attempts - 1, Ordering::Relaxed);
                    drop(slot);
                }));
                i += 1;
            }
            for delivery in deliveries {
                delivery.await.expect("delivery");
            }
            i
        })
    };

    // The killer: every few seconds, SIGKILL one host, then start it again.
    let started = Instant::now();
    let mut kills = 0usize;
    while started.elapsed() < duration {
        tokio::time::sleep(KILL_EVERY).await;
        let which = kills % hosts.len();
        // Killed first, forgotten after: requests in flight and those sent
        // meanwhile hit a dead host, as a provider's would.
        hosts[which].kill();
        tokio::time::sleep(Duration::from_millis(200)).await;
        addresses.lock().unwrap_or_else(|e| e.into_inner())[which] = None;
        kills += 1;
        let name = format!("host-{}-{kills}", ["a", "b"][which]);
        hosts[which] = LoggedProcess::start(dir.path(), &args, &name).await;
        addresses.lock().unwrap_or_else(|e| e.into_inner())[which] =
            Some(hosts[which].address.clone());
    }
    stop.store(true, Ordering::Relaxed);
    let events = providers.await.expect("providers");
    let js = jetstream(&nats).await;

    // Every event handled: its sales order made, then its emit stored
    // (reading the whole stream is slow: polled once a second).
    // The backlog left by the kills drains at the handler's pace: waited
    // for as long as it moves.
    let at_load_end = erp.erp().sales_orders().len() as u64;
    let drain = Instant::now();
    let (mut made, mut moved) = (at_load_end, Instant::now());
    while made < events {
        assert!(
            moved.elapsed() < Duration::from_secs(90),
            "no sales order for 90 s: {made} of {events} made"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = erp.erp().sales_orders().len() as u64;
        if now > made {
            (made, moved) = (now, Instant::now());
        }
    }
    let drained_in = drain.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (messages(&js, "hook.order-sync.").await.len() as u64) < events {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for every emit"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // Stored: each event's body exactly once in HOOK_EVENTS.
    let mut stored: BTreeMap<String, usize> = BTreeMap::new();
    for (subject, payload) in messages(&js, "hook.crm.").await {
        assert!(subject.contains(".order.created"), "{subject}");
        let id = payload["data"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *stored.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    let lost: Vec<u64> = (0..events)
        .filter(|i| !stored.contains_key(&format!("ORD-{i}")))
        .collect();

    // Handled: one emit per event (the host deduplicates re-emits), by
    // the entity it is about (the ERP's sales order).
    let emitted = messages(&js, "hook.order-sync.").await;
    let mut emits: BTreeMap<String, usize> = BTreeMap::new();
    for (subject, _) in &emitted {
        let entity = subject.split('.').nth(4).unwrap_or_default().to_string();
        *emits.entry(entity).or_default() += 1;
    }
    let emitted_twice: Vec<_> = emits.iter().filter(|(_, n)| **n > 1).collect();

    // The ERP: one effect per event — one answer that was not a replay
    // per idempotency key, one sales order per order.
    let mut effects: BTreeMap<String, usize> = BTreeMap::new();
    for seen in erp.erp().requests() {
        if let Some(key) = &seen.request.idempotency_key
            && !seen.replayed
            && (200..300).contains(&seen.status)
        {
            *effects.entry(key.clone()).or_default() += 1;
        }
    }
    let repeated: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).collect();
    let orders = erp.erp().sales_orders();
    let replays = erp.erp().requests().iter().filter(|s| s.replayed).count();

    // The figures first, so a failing long run still reports them.
    eprintln!(
        "soak: {}s, {kills} hosts killed, {events} events posted, {} provider retries; \
         2xx {events}, stored {} (twice {}, lost {}), handled {} emits for {} entities, \
         ERP effects {} (twice {}), sales orders {}, ERP replays (same key again) \
         {replays}; {at_load_end} handled when the load stopped, the rest drained in \
         {drained_in:.0?}",
        duration.as_secs(),
        retried.load(Ordering::Relaxed),
        stored.values().sum::<usize>(),
        twice.len(),
        lost.len(),
        emitted.len(),
        emits.len(),
        effects.len(),
        repeated.len(),
        orders.len(),
    );
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    assert!(lost.is_empty(), "answered 2xx but not stored: {lost:?}");
    assert_eq!(stored.len() as u64, events);
    assert!(emitted_twice.is_empty(), "emitted twice: {emitted_twice:?}");
    assert_eq!(emitted.len() as u64, events, "one emit per event");
    assert!(repeated.is_empty(), "ERP effects twice: {repeated:?}");
    assert_eq!(effects.len() as u64, events, "one ERP effect per event");
    assert_eq!(orders.len() as u64, events, "one sales order per order");
}
