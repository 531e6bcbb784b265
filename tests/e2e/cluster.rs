//! hookmesh on a 3-node JetStream cluster (`[nats] replicas = 3`): two
//! `hookmesh serve` processes under webhook load while nodes are killed
//! with SIGKILL and restarted. Every 2xx'd event is in `HOOK_EVENTS`
//! exactly once, the handler handles each entity's events in order,
//! `/readyz` follows the cluster's quorum, and a 503 answers only while a
//! quorum is missing (or a new stream leader is being elected). Growing a
//! running single-replica system to R3 with `streams apply` loses nothing
//! either.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use hookmesh::config::{Config, Env, Origin};
use hookmesh_test_support::NatsCluster;
use tokio::sync::watch;

use crate::security::{cli, stderr};
use crate::support::*;

/// Entities posting concurrently, each one event at a time in order.
const ENTITIES: usize = 8;
/// The pause between one entity's events (keeps the handler's backlog
/// short, so the test ends soon after the load).
const PACE: Duration = Duration::from_millis(60);

/// The recorder, with a retry budget (30 attempts, backoff 200 ms doubling
/// to 3 s: about 80 s) that outlasts the outages the tests cause: its
/// state writes fail while the state bucket has no quorum, and an event
/// that runs out of attempts is a dead letter, as configured (with 10
/// attempts of at most 500 ms, two events were, in a 10 s quorum loss).
fn recorder_manifest() -> &'static str {
    "name = \"rec\"\nsubject = \"crm.ticket.>\"\nmax_deliver = 30\nack_wait = \"5s\"\n\
     timeout = \"3s\"\n[backoff]\ninitial = \"200ms\"\nmax = \"3s\"\n"
}

fn ticket(entity: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"type": "ticket.updated", "data": {"id": entity}}))
        .expect("json")
}

/// The cluster, a config for it, the CLI and a JetStream view.
struct Bed {
    cluster: NatsCluster,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    js: jetstream::Context,
}

impl Bed {
    async fn new(replicas: usize) -> Bed {
        let cluster = NatsCluster::start(3).expect("3-node cluster");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_config(dir.path(), &cluster.urls(), replicas);
        let loaded = load(&config);
        let client = hookmesh::nats::connect(
            &loaded.nats,
            "hookmesh-test",
            hookmesh::nats::Patience::FailFast,
        )
        .await
        .expect("connects to the cluster");
        let js = jetstream::new(client.clone());
        // (The client's own account-info type does not parse 2.9's answer.)
        wait_for(
            Duration::from_secs(30),
            "a JetStream metadata leader",
            || async {
                match client.request("$JS.API.INFO", "".into()).await {
                    Ok(reply) => serde_json::from_slice::<serde_json::Value>(&reply.payload)
                        .is_ok_and(|info| info.get("error").is_none()),
                    Err(_) => false,
                }
            },
        )
        .await;
        let bed = Bed {
            cluster,
            dir,
            config,
            js,
        };
        bed.ok(&["streams", "apply"]);
        let manifest = bed.dir.path().join("rec.toml");
        std::fs::write(&manifest, recorder_manifest()).expect("manifest");
        let wasm = guest("fixture_recorder").display().to_string();
        bed.ok(&[
            "deploy",
            &wasm,
            "--manifest",
            &manifest.display().to_string(),
        ]);
        bed
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = cli(self.dir.path(), &self.config, args);
        assert!(out.status.success(), "hookmesh {args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A host, once it runs dispatch.
    async fn host(&self, name: &str) -> LoggedProcess {
        let mut host = self.spawn_host(name);
        assert!(
            host.started_within(Duration::from_secs(90)).await,
            "{name} did not start dispatch within 90 s; its log ends:\n{}",
            tail(&host.log(), 40)
        );
        host
    }

    /// A host, started without waiting for it.
    fn spawn_host(&self, name: &str) -> LoggedProcess {
        let cache = guest_cache_dir().display().to_string();
        let config = self.config.display().to_string();
        let args = ["serve", "--config", &config, "--cache-dir", &cache];
        LoggedProcess::spawn(self.dir.path(), &args, name, &[])
    }

    /// Two hosts, `<prefix>-a` and `<prefix>-b`, once they share `rec`'s
    /// partitions.
    async fn two_hosts(&self, prefix: &str) -> (LoggedProcess, LoggedProcess) {
        let a = self.host(&format!("{prefix}-a")).await;
        let b = self.host(&format!("{prefix}-b")).await;
        wait_for(Duration::from_secs(30), "the hosts share rec", || async {
            let owned = [a.owned("rec").await, b.owned("rec").await];
            owned.iter().all(|n| *n > 0) && owned.iter().sum::<u64>() == 16
        })
        .await;
        (a, b)
    }

    /// Which node leads `HOOK_EVENTS` (0-based), when one does.
    async fn events_leader(&self) -> Option<usize> {
        let mut stream = self.js.get_stream("HOOK_EVENTS").await.ok()?;
        let info = stream.info().await.ok()?;
        let leader = info.cluster.as_ref()?.leader.clone()?;
        leader
            .strip_prefix('n')?
            .parse::<usize>()
            .ok()
            .map(|n| n - 1)
    }

    /// Waits until every hookmesh stream has `replicas` current replicas.
    async fn wait_current(&self, replicas: usize) {
        for name in hookmesh::streams::names() {
            hookmesh::streams::replicas::wait_current(
                &self.js,
                name,
                replicas,
                Duration::from_secs(120),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

fn write_config(dir: &Path, urls: &[String], replicas: usize) -> std::path::PathBuf {
    let path = dir.join("hookmesh.toml");
    let list = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let options = Options {
        nats_toml: format!("url = [{list}]\nreplicas = {replicas}\n"),
        ..Options::default()
    };
    // `config_toml` writes `url = "<first>"`; the list below it wins as
    // the later key cannot repeat in TOML, so drop the single one.
    let text = config_toml(&urls[0], &options).replacen(&format!("url = \"{}\"\n", urls[0]), "", 1);
    std::fs::write(&path, text).expect("config");
    path
}

fn load(path: &Path) -> Config {
    let text = std::fs::read_to_string(path).expect("config");
    Config::from_toml(&text, Origin::Builtin, &Env::default()).expect("valid config")
}

/// What the load saw.
#[derive(Debug, Default)]
struct Tally {
    /// Per entity, the event ids answered 2xx, in the order sent.
    accepted: BTreeMap<String, Vec<String>>,
    /// 503 answers (each retried, as a provider does).
    unavailable: usize,
    /// Requests that failed without an answer.
    transport: usize,
}

/// Provider-like senders: each entity posts its events one after the
/// other, alternating between the hosts, retrying the same event id on a
/// 503 or a transport error until it is answered 2xx.
struct Load {
    tally: Arc<Mutex<Tally>>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(config: &Config, hosts: &[&LoggedProcess]) -> Load {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (stop, stopped) = watch::channel(false);
        let provider = config.providers["crm"].clone();
        let urls: Vec<String> = (hosts.iter())
            .map(|h| format!("http://{}/webhooks/crm", h.address))
            .collect();
        let tasks = (0..ENTITIES)
            .map(|e| {
                let (tally, stopped, provider, urls) = (
                    tally.clone(),
                    stopped.clone(),
                    provider.clone(),
                    urls.clone(),
                );
                tokio::spawn(async move {
                    let entity = format!("E{e:02}");
                    let mut attempt = e;
                    for version in 0.. {
                        if *stopped.borrow() {
                            break;
                        }
                        let id = format!("{entity}-{version:05}");
                        loop {
                            attempt += 1;
                            let signed = hookmesh::send::prepare(
                                &provider,
                                ticket(&entity),
                                None,
                                Some(&id),
                                SystemTime::now(),
                            )
                            .expect("signs");
                            let url = &urls[attempt % urls.len()];
                            match hookmesh::send::post(url, signed).await {
                                Ok(answer) if answer.status == 202 || answer.status == 200 => {
                                    let mut tally = tally.lock().expect("tally");
                                    tally.accepted.entry(entity.clone()).or_default().push(id);
                                    break;
                                }
                                Ok(answer) => {
                                    assert_eq!(answer.status, 503, "{}", answer.body);
                                    tally.lock().expect("tally").unavailable += 1;
                                }
                                Err(_) => tally.lock().expect("tally").transport += 1,
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        tokio::time::sleep(PACE).await;
                    }
                })
            })
            .collect();
        Load { tally, stop, tasks }
    }

    /// Stops after each entity's event in hand is answered 2xx.
    async fn finish(self) -> Tally {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.await.expect("sender");
        }
        Arc::try_unwrap(self.tally)
            .map(|m| m.into_inner().expect("tally"))
            .unwrap_or_else(|arc| std::mem::take(&mut *arc.lock().expect("tally")))
    }

    fn accepted(&self) -> usize {
        let tally = self.tally.lock().expect("tally");
        tally.accepted.values().map(Vec::len).sum()
    }
}

async fn readyz(host: &LoggedProcess) -> u16 {
    match reqwest::get(format!("http://{}/readyz", host.admin)).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Waits until the load has had `n` more events accepted.
async fn accepted_more(load: &Load, n: usize, what: &str) {
    let start = load.accepted();
    wait_for(Duration::from_secs(30), what, || async {
        load.accepted() >= start + n
    })
    .await;
}

/// Every accepted event is stored exactly once, and the handler saw each
/// entity's events in the order they were accepted: the events accepted,
/// and how many runs repeated an event handled before.
async fn check(bed: &Bed, tally: &Tally) -> (usize, usize) {
    let mut stored: HashMap<String, usize> = HashMap::new();
    for message in stored_messages(&bed.js, "HOOK_EVENTS").await {
        if !message.subject.starts_with("hook.crm.") {
            continue;
        }
        let id = (message.headers.get("Hook-Event-Id"))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        *stored.entry(id).or_default() += 1;
    }
    let accepted: usize = tally.accepted.values().map(Vec::len).sum();
    let mut missing = Vec::new();
    let mut twice = Vec::new();
    for id in tally.accepted.values().flatten() {
        match stored.get(id) {
            None => missing.push(id.clone()),
            Some(1) => {}
            Some(n) => twice.push((id.clone(), *n)),
        }
    }
    eprintln!(
        "{accepted} events accepted, {} stored, {} answered 503 (retried), {} transport errors",
        stored.len(),
        tally.unavailable,
        tally.transport
    );
    if !missing.is_empty() {
        let state = match bed.js.get_stream("HOOK_EVENTS").await {
            Ok(mut stream) => format!("{:?}", stream.info().await.map(|i| i.state.clone())),
            Err(e) => e.to_string(),
        };
        panic!("2xx'd but not stored: {missing:?}\nHOOK_EVENTS now: {state}");
    }
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    assert_eq!(stored.len(), accepted, "nothing stored that was not 2xx'd");

    caught_up(bed, tally).await;
    let mut again = 0;
    for (entity, ids) in &tally.accepted {
        let (first, repeats) = seen(&bed.js, entity).await;
        assert_eq!(&first, ids, "{entity}: each event first handled in order");
        again += repeats;
    }
    eprintln!("{again} events handled again (an ack lost with a killed node)");
    (accepted, again)
}

/// Waits until the handler has seen every accepted event; when it has not
/// within the limit, prints what each entity and each partition consumer
/// is at before failing, so a stall can be told from a slow recovery.
async fn caught_up(bed: &Bed, tally: &Tally) {
    let limit = Duration::from_secs(120);
    let started = std::time::Instant::now();
    loop {
        let mut behind = Vec::new();
        for (entity, ids) in &tally.accepted {
            let handled = seen(&bed.js, entity).await.0.len();
            if handled < ids.len() {
                behind.push(format!("{entity}: {handled} of {}", ids.len()));
            }
        }
        if behind.is_empty() {
            eprintln!(
                "the handler caught up {:?} after the cluster was whole",
                started.elapsed()
            );
            return;
        }
        if started.elapsed() > limit {
            let mut consumers = Vec::new();
            if let Ok(stream) = bed.js.get_stream("HOOK_EVENTS").await {
                for p in 0..16 {
                    let name = format!("handler_rec_{p}");
                    consumers.push(match stream.consumer_info(&name).await {
                        Ok(i) => format!(
                            "{name}: pending {} ack_pending {} waiting {} delivered {} ack_floor {} leader {:?}",
                            i.num_pending,
                            i.num_ack_pending,
                            i.num_waiting,
                            i.delivered.stream_sequence,
                            i.ack_floor.stream_sequence,
                            i.cluster.as_ref().and_then(|c| c.leader.clone())
                        ),
                        Err(e) => format!("{name}: {e}"),
                    });
                }
            }
            let dead: Vec<String> = stored_messages(&bed.js, "HOOK_DLQ")
                .await
                .iter()
                .map(|m| {
                    let header = |name: &str| {
                        (m.headers.get(name))
                            .map(|v| v.as_str().to_string())
                            .unwrap_or_default()
                    };
                    format!("{} {}", m.subject, header("Hook-Dlq-Reason"))
                })
                .collect();
            panic!(
                "the handler did not catch up within {limit:?}: {behind:?}\n{}\ndead letters: {dead:?}",
                consumers.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The ids the recorder saw for `entity` in the order each was first
/// handled, and how many runs repeated one handled before: a node killed
/// with an ack it had not yet replicated redelivers an event that was
/// handled already (at least once), never one before its predecessor.
async fn seen(js: &jetstream::Context, entity: &str) -> (Vec<String>, usize) {
    let text = crate::handlers::state(js, "rec", &format!("seen/{entity}"))
        .await
        .unwrap_or_default();
    let mut first: Vec<String> = Vec::new();
    let mut repeats = 0;
    for id in text.lines() {
        if first.iter().any(|f| f == id) {
            repeats += 1;
        } else {
            first.push(id.to_string());
        }
    }
    (first, repeats)
}

/// Two hosts under load on a 3-node R3 cluster: a node killed and
/// restarted, another killed, then the quorum lost and regained.
///
/// On nats-server 2.10 and later. On 2.9.10 the server itself lost
/// acknowledged writes here (9 events answered with a PubAck, then gone
/// after the nodes that held them were killed in turn and a node with an
/// older log led again), so the test says so and checks nothing there;
/// see docs/scale-out.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_keeps_every_event_while_nodes_die_and_return() {
    let mut bed = Bed::new(3).await;
    let version = bed.js.client().server_info().version;
    if !hookmesh::streams::replicas::at_least(
        &version,
        hookmesh::streams::CLUSTER_KEEPS_ACKED_WRITES_FROM,
    ) {
        eprintln!(
            "nats-server {version}: not run — this server lost acknowledged writes when R3 \
             nodes were killed in turn (docs/scale-out.md)"
        );
        return;
    }
    bed.wait_current(3).await;
    let (a, b) = bed.two_hosts("r3-host").await;
    let config = load(&bed.config);
    let load_run = Load::start(&config, &[&a, &b]);
    accepted_more(&load_run, 30, "load under way").await;

    // One node down: the streams keep a quorum.
    let first = bed.events_leader().await.unwrap_or(0);
    bed.cluster.kill(first);
    accepted_more(&load_run, 30, "events accepted with a node down").await;
    for host in [&a, &b] {
        wait_for(
            Duration::from_secs(30),
            "ready with one node down",
            || async { readyz(host).await == 200 },
        )
        .await;
    }
    bed.cluster.restart(first).expect("node restarts");
    bed.wait_current(3).await;
    accepted_more(&load_run, 30, "events accepted after the restart").await;

    // Another node down.
    let second = (first + 1) % 3;
    bed.cluster.kill(second);
    accepted_more(&load_run, 30, "events accepted with another node down").await;
    for host in [&a, &b] {
        wait_for(Duration::from_secs(30), "ready again", || async {
            readyz(host).await == 200
        })
        .await;
    }
    let mut tally = load_run.finish().await;

    // Two nodes down: no quorum, so no 2xx — a 503 with Retry-After, and
    // /readyz says not ready; back when a second node returns.
    let third = (first + 2) % 3;
    bed.cluster.kill(third);
    wait_for(
        Duration::from_secs(30),
        "not ready without a quorum",
        || async { readyz(&a).await == 503 },
    )
    .await;
    let provider = &config.providers["crm"];
    let signed = hookmesh::send::prepare(
        provider,
        ticket("E-QUORUM"),
        None,
        Some("E-QUORUM-0"),
        SystemTime::now(),
    )
    .expect("signs");
    let url = format!("http://{}/webhooks/crm", a.address);
    let answer = hookmesh::send::post(&url, signed.clone())
        .await
        .expect("answered");
    assert_eq!(answer.status, 503, "no quorum, no 2xx: {}", answer.body);
    bed.cluster.restart(second).expect("node restarts");
    wait_for(
        Duration::from_secs(30),
        "ready with a quorum again",
        || async { readyz(&a).await == 200 },
    )
    .await;
    // A 503 says "not stored for sure", not "not stored": the server may
    // still store the publish once its quorum returns. The provider
    // retries, as providers do, and gets a 2xx — 200 if it was stored.
    wait_for(
        Duration::from_secs(30),
        "the 503'd event accepted",
        || async {
            hookmesh::send::post(&url, signed.clone())
                .await
                .is_ok_and(|answer| answer.status == 202 || answer.status == 200)
        },
    )
    .await;
    tally
        .accepted
        .insert("E-QUORUM".into(), vec!["E-QUORUM-0".into()]);
    bed.cluster.restart(third).expect("node restarts");
    bed.wait_current(3).await;

    check(&bed, &tally).await;
}

/// `streams apply` with `replicas = 3` on a running system whose streams
/// are R1, then — two seconds after it reports done — the node that held
/// the only copy is killed: nothing 2xx'd is lost, each entity's events are
/// first handled in order, and the handlers' consumers keep their positions
/// (few events run again, not all of them).
///
/// On nats-server 2.10 and later this happens under load with the hosts
/// running. Before 2.10 the server drops a consumer's positions when its
/// stream grows while the consumer is in use, so `streams apply` refuses
/// while hosts run, naming the procedure; the test checks the refusal and
/// then follows the procedure (stop the hosts, apply, start them again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r1_to_r3_under_load_then_a_node_kill_loses_nothing() {
    let mut bed = Bed::new(1).await;
    let version = bed.js.client().server_info().version;
    let under_load = hookmesh::streams::replicas::grows_consumers_safely(&version);
    let (mut a, mut b) = bed.two_hosts("r1r3-host").await;
    let config = load(&bed.config);
    let load_run = Load::start(&config, &[&a, &b]);
    accepted_more(&load_run, 60, "load under way").await;

    let holder = bed.events_leader().await.expect("HOOK_EVENTS has a leader");
    std::fs::write(
        &bed.config,
        std::fs::read_to_string(&bed.config)
            .expect("config")
            .replace("replicas = 1", "replicas = 3"),
    )
    .expect("config");
    let (tally, hosts, holder_back) = if under_load {
        let out = bed.ok(&["streams", "apply"]);
        assert!(out.contains("Rescaled { from: 1, to: 3 }"), "{out}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        bed.cluster.kill(holder);
        accepted_more(&load_run, 60, "events accepted after the kill").await;
        (load_run.finish().await, vec![a, b], false)
    } else {
        let refused = cli(bed.dir.path(), &bed.config, &["streams", "apply"]);
        let said = stderr(&refused);
        assert!(!refused.status.success(), "nats-server {version}: {said}");
        assert!(
            said.contains("host(s) run now") && said.contains("Stop the hosts"),
            "the refusal names the procedure: {said}"
        );
        assert!(
            said.contains("run clusters on nats-server 2.10 or later"),
            "a cluster on this version is warned about: {said}"
        );
        let mut events = bed.js.get_stream("HOOK_EVENTS").await.expect("stream");
        let info = events.info().await.expect("info");
        assert_eq!(info.config.num_replicas, 1, "a refusal changes nothing");
        let tally = load_run.finish().await;
        a.stop();
        b.stop();
        let out = bed.ok(&["streams", "apply"]);
        assert!(out.contains("Rescaled { from: 1, to: 3 }"), "{out}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        bed.cluster.kill(holder);
        let mut hosts = vec![
            bed.spawn_host("r1r3-host-a2"),
            bed.spawn_host("r1r3-host-b2"),
        ];
        // nats-server 2.9 can report a grown stream's new replicas current
        // while their catch-up from the old node has stalled; lost then,
        // that node leaves the stream without a leader until it returns
        // (docs/scale-out.md). The hosts wait for it, saying so in their
        // log, and start once the node is back.
        let mut started = true;
        for host in &mut hosts {
            started &= host.started_within(Duration::from_secs(30)).await;
        }
        if !started {
            eprintln!(
                "nats-server {version}: a stream had no leader 30 s after its old node was lost; \
                 restarting that node"
            );
            bed.cluster.restart(holder).expect("node restarts");
            for host in &mut hosts {
                assert!(
                    host.started_within(Duration::from_secs(90)).await,
                    "a host did not start once the node was back; its log ends:\n{}",
                    tail(&host.log(), 40)
                );
            }
        }
        (tally, hosts, !started)
    };
    if !holder_back {
        bed.cluster.restart(holder).expect("node restarts");
    }
    bed.wait_current(3).await;

    let (accepted, again) = check(&bed, &tally).await;
    assert!(
        again * 10 < accepted,
        "the consumers kept their positions: {again} of {accepted} events ran again"
    );
    drop(hosts);
}
