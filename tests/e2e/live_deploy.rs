//! Hot deploy on running hosts: versions swapped live while events flow,
//! rolled back, refused when they cannot start, removed — and `up`
//! redeploying a handler directory as it changes. Real host processes,
//! real components, a real nats-server.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hookmesh::audit::Action;
use hookmesh::deploy::{self, Deployed};
use hookmesh::manifest::Manifest;
use serde_json::json;
use tokio::sync::watch;

use crate::deploy::Bed;
use crate::handlers::state;
use crate::support::*;

/// The recorder fixture's manifest, recording `<id>@<tag>`.
fn recorder_manifest(tag: &str, component: Option<&Path>) -> String {
    let component = component
        .map(|c| format!("component = {:?}\n", c.display().to_string()))
        .unwrap_or_default();
    format!(
        "name = \"rec\"\n{component}subject = \"crm.ticket.>\"\nmax_deliver = 2\nack_wait = \"10s\"\n\
         timeout = \"2s\"\n[backoff]\ninitial = \"100ms\"\nmax = \"200ms\"\n[config]\ntag = \"{tag}\"\n"
    )
}

fn ticket(id: &str, fail: bool) -> Vec<u8> {
    let mut body = json!({"type": "ticket.updated", "data": {"id": id}});
    if fail {
        body["fail_until_attempt"] = json!(1000);
    }
    serde_json::to_vec(&body).expect("json")
}

/// What the recorder saw for an entity: `(event id, tag)`, oldest first.
async fn seen(bed: &Bed, entity: &str) -> Vec<(String, String)> {
    state(&bed.js, "rec", &format!("seen/{entity}"))
        .await
        .map(|s| {
            s.lines()
                .map(|line| {
                    let (id, tag) = line.split_once('@').unwrap_or((line, ""));
                    (id.to_string(), tag.to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn version_line(version: &str) -> String {
    format!("hookmesh_handler_version{{handler=\"rec\",version=\"{version}\"}} 1")
}

async fn current_version(bed: &Bed) -> String {
    bed.store()
        .await
        .current("rec")
        .await
        .expect("store")
        .expect("deployed")
        .version
}

/// Waits until every host runs `version` of `rec`.
async fn wait_version(hosts: &[&LoggedProcess], version: &str) {
    wait_for(
        Duration::from_secs(30),
        &format!("every host on {version}"),
        || async {
            for host in hosts {
                if !host.metrics().await.contains(&version_line(version)) {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// True when `tags` reads `a…a b…b a…a` (any part may be empty).
fn deploy_then_rollback(tags: &[String]) -> bool {
    let mut phase = 0;
    for tag in tags {
        phase = match (phase, tag.as_str()) {
            (0, "a") => 0,
            (0 | 1, "b") => 1,
            (1 | 2, "a") => 2,
            _ => return false,
        };
    }
    true
}

#[test]
fn the_pattern_check_accepts_only_deploy_then_rollback() {
    let tags = |s: &str| s.chars().map(|c| c.to_string()).collect::<Vec<_>>();
    for ok in ["", "aaa", "aabba", "bb", "bba", "abbaa"] {
        assert!(deploy_then_rollback(&tags(ok)), "{ok}");
    }
    for bad in ["aba b", "abab", "ba b", "c"] {
        assert!(!deploy_then_rollback(&tags(&bad.replace(' ', ""))), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_swap_versions_live_and_roll_back_losing_doubling_and_reordering_nothing() {
    const ENTITIES: usize = 16;
    const EVENTS: usize = 12;
    let bed = Bed::new().await;
    let wasm = guest("fixture_recorder").display().to_string();
    let manifest_a = bed.file("rec-a.toml", recorder_manifest("a", None).as_bytes());
    let manifest_b = bed.file("rec-b.toml", recorder_manifest("b", None).as_bytes());
    bed.ok(&["deploy", &wasm, "--manifest", &manifest_a]);
    let v1 = current_version(&bed).await;
    let cache = guest_cache_dir().display().to_string();
    let config = bed.config.display().to_string();
    let args = ["serve", "--config", &config, "--cache-dir", &cache];
    let one = LoggedProcess::start(bed.dir.path(), &args, "host-1").await;
    let two = LoggedProcess::start(bed.dir.path(), &args, "host-2").await;
    wait_version(&[&one, &two], &v1).await;

    // Per entity, events go out one after another, alternately to either
    // host; events 4.. wait for the new version on both hosts, events 8..
    // for the rollback on both.
    let (phase, phases) = watch::channel(0usize);
    let mut senders = tokio::task::JoinSet::new();
    for e in 0..ENTITIES {
        let hosts = [one.address.clone(), two.address.clone()];
        let mut phases = phases.clone();
        senders.spawn(async move {
            let entity = format!("T-{e}");
            for n in 0..EVENTS {
                phases
                    .wait_for(|p| *p >= n / 4)
                    .await
                    .expect("phase sender alive");
                let host = &hosts[(e + n) % 2];
                send_crm(host, ticket(&entity, false), &format!("{entity}-{n:02}")).await;
            }
        });
    }
    // Other entities send without pause across both swaps, so events are
    // in flight at the moment each swap lands.
    const STREAMING: usize = 8;
    let (done, finished) = watch::channel(false);
    let mut streamers = tokio::task::JoinSet::new();
    for e in 0..STREAMING {
        let hosts = [one.address.clone(), two.address.clone()];
        let finished = finished.clone();
        streamers.spawn(async move {
            let entity = format!("S-{e}");
            let mut n = 0;
            while !*finished.borrow() {
                send_crm(
                    &hosts[n % 2],
                    ticket(&entity, false),
                    &format!("{entity}-{n:04}"),
                )
                .await;
                n += 1;
            }
            (e, n)
        });
    }
    let recorded = || async {
        let mut total = 0;
        for e in 0..ENTITIES {
            total += seen(&bed, &format!("T-{e}")).await.len();
        }
        total
    };

    // Deploy while the first events are being sent and handled.
    bed.ok(&["deploy", &wasm, "--manifest", &manifest_b]);
    let v2 = current_version(&bed).await;
    assert_ne!(v1, v2);
    wait_version(&[&one, &two], &v2).await;
    phase.send(1).expect("senders");
    // Roll back while the second events are flowing.
    wait_for(
        Duration::from_secs(30),
        "half the second events",
        || async { recorded().await >= ENTITIES * 4 + ENTITIES * 2 },
    )
    .await;
    bed.ok(&["handlers", "rollback", "rec"]);
    let v3 = current_version(&bed).await;
    assert!(
        v3.starts_with("3-") && v3.ends_with(&v1[2..]),
        "{v3} rolls {v1} back"
    );
    wait_version(&[&one, &two], &v3).await;
    phase.send(2).expect("senders");
    while let Some(sent) = senders.join_next().await {
        sent.expect("sender");
    }
    done.send(true).expect("streamers");
    let mut streamed = BTreeMap::new();
    while let Some(sent) = streamers.join_next().await {
        let (e, n) = sent.expect("streamer");
        streamed.insert(e, n);
    }
    wait_for(Duration::from_secs(30), "every event recorded", || async {
        recorded().await == ENTITIES * EVENTS
    })
    .await;
    let mut streamed_on_b = 0;
    for e in 0..STREAMING {
        let entity = format!("S-{e}");
        wait_for(
            Duration::from_secs(30),
            "every streamed event recorded",
            || async { seen(&bed, &entity).await.len() >= streamed[&e] },
        )
        .await;
        let seen = seen(&bed, &entity).await;
        let ids: Vec<_> = seen.iter().map(|(id, _)| id.clone()).collect();
        let expected: Vec<_> = (0..ids.len().max(streamed[&e]))
            .map(|n| format!("{entity}-{n:04}"))
            .collect();
        assert_eq!(ids, expected, "each event once, in order, for {entity}");
        let tags: Vec<_> = seen.iter().map(|(_, tag)| tag.clone()).collect();
        assert!(deploy_then_rollback(&tags), "{entity}: {tags:?}");
        streamed_on_b += tags.iter().filter(|t| *t == "b").count();
    }
    assert!(
        streamed_on_b > 0,
        "the streaming entities met the new version"
    );

    let mut on_b_while_active = 0;
    for e in 0..ENTITIES {
        let entity = format!("T-{e}");
        let seen = seen(&bed, &entity).await;
        let ids: Vec<_> = seen.iter().map(|(id, _)| id.clone()).collect();
        let expected: Vec<_> = (0..EVENTS).map(|n| format!("{entity}-{n:02}")).collect();
        assert_eq!(ids, expected, "each event once, in order, for {entity}");
        let tags: Vec<_> = seen.iter().map(|(_, tag)| tag.clone()).collect();
        assert!(
            deploy_then_rollback(&tags),
            "{entity}: each event on the version active when it started: {tags:?}"
        );
        assert!(
            tags[8..].iter().all(|t| t == "a"),
            "{entity}: sent after the rollback, handled by it: {tags:?}"
        );
        on_b_while_active += tags[4..8].iter().filter(|t| *t == "b").count();
    }
    assert!(
        on_b_while_active >= ENTITIES * 2,
        "the new version handled what came while it was active ({on_b_while_active})"
    );
    for host in [&one, &two] {
        assert!(
            host.metrics()
                .await
                .contains("hookmesh_events_handled_total{handler=\"rec\",outcome=\"ok\"}"),
            "both hosts took part"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_cannot_start_is_refused_by_the_host_while_the_old_one_serves() {
    let bed = Bed::new().await;
    let wasm = guest("fixture_recorder").display().to_string();
    let manifest_a = bed.file("rec-a.toml", recorder_manifest("a", None).as_bytes());
    bed.ok(&["deploy", &wasm, "--manifest", &manifest_a]);
    let v1 = current_version(&bed).await;
    let host = TestHost::start(&bed.nats).await;
    let runs = |version: &str| {
        let line = version_line(version);
        let host = &host;
        async move { host.admin_get("/metrics").await.1.contains(&line) }
    };
    wait_for(Duration::from_secs(30), "v1 active", || runs(&v1)).await;

    // A component that traps while starting, past the CLI's own check (as
    // an older CLI or another tool could store it).
    let validated = validated("fixture_trap_at_start");
    let manifest =
        Manifest::from_toml(&recorder_manifest("c", None), "rec-c.toml").expect("manifest");
    let store = bed.store().await;
    let Deployed::Activated { deployment, .. } = store
        .deploy(manifest, &validated, "test")
        .await
        .expect("stored")
    else {
        panic!("a new version");
    };
    let v2 = deployment.version;
    wait_for(Duration::from_secs(30), "the refusal audited", || async {
        bed.audit()
            .await
            .iter()
            .any(|(_, r)| r.action == Action::ActivationFailed)
    })
    .await;
    let audit = bed.audit().await;
    let (subject, refusal) = audit
        .iter()
        .find(|(_, r)| r.action == Action::ActivationFailed)
        .expect("refusal");
    assert_eq!(subject, "audit.activation-failed.rec");
    assert!(refusal.actor.starts_with("host:"), "{}", refusal.actor);
    assert_eq!(refusal.version.as_deref(), Some(v2.as_str()));
    assert_eq!(refusal.previous_version.as_deref(), Some(v1.as_str()));
    assert!(refusal.error.as_deref().is_some_and(|e| !e.is_empty()));
    // The alert rules see it: the counter moved, and every partition of
    // the handler is still owned here.
    // (The partition gauges appear once this host's claims are written,
    // which may come after the refusal's audit record.)
    let lines = [
        r#"hookmesh_activation_failures_total{handler="rec"} 1"#,
        r#"hookmesh_partitions{handler="rec"} 16"#,
        r#"hookmesh_partitions_owned{handler="rec"} 16"#,
    ];
    wait_for(
        Duration::from_secs(20),
        "the refusal counted, every partition owned",
        || async {
            let metrics = host.metrics().await;
            lines.iter().all(|line| metrics.contains(line))
        },
    )
    .await;

    // The old version keeps serving, and stamps its version on failures.
    assert!(runs(&v1).await);
    host.send("crm", ticket("T-1", false), "k-1").await;
    wait_for(Duration::from_secs(10), "handled by v1", || async {
        seen(&bed, "T-1").await == [("k-1".to_string(), "a".to_string())]
    })
    .await;
    let failing = host.send("crm", ticket("T-2", true), "k-2").await;
    let stream_seq = failing.json["stream_seq"].as_u64().expect("seq");
    wait_for(Duration::from_secs(20), "the dead letter", || async {
        !hookmesh::dlq::store::list(&bed.js, &Default::default())
            .await
            .expect("list")
            .is_empty()
    })
    .await;
    let dead = hookmesh::dlq::store::list(&bed.js, &Default::default())
        .await
        .expect("list");
    assert_eq!(dead[0].handler_version, v1);
    let record = hookmesh::dispatch::attempt_record(&bed.js, "rec", stream_seq)
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.handler_version, v1);

    // Removed: dispatch stops, the consumers stay; back with --to 1.
    bed.ok(&["handlers", "remove", "rec"]);
    // Stopped: no version, and every partition handed over (its workers'
    // pull requests ended, so none is open for T-3 to be delivered to).
    wait_for(Duration::from_secs(10), "dispatch stopped", || async {
        !host
            .admin_get("/metrics")
            .await
            .1
            .contains("handler_version{handler=\"rec\"")
            && host.owned("rec").await == 0
    })
    .await;
    // A removed handler has no partitions to own: nothing to alert on.
    wait_for(
        Duration::from_secs(10),
        "its partition count gone",
        || async {
            !host
                .metrics()
                .await
                .contains("hookmesh_partitions{handler=\"rec\"}")
        },
    )
    .await;
    let t3 = host.send("crm", ticket("T-3", false), "k-3").await.json;
    let t3_seq = t3["stream_seq"].as_u64().expect("seq");
    let t3_consumer = hookmesh::manifest::consumer_name(
        "rec",
        partition_of(t3["subject"].as_str().expect("subject")),
    );
    // A running dispatcher holds a pull open on every partition, so the
    // server would deliver T-3 at once; while removed it never does (a
    // slow handler would show as delivered, not yet acked).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let info = events(&bed.js)
        .await
        .consumer_info(&t3_consumer)
        .await
        .expect("the consumer is kept");
    assert!(
        info.delivered.stream_sequence < t3_seq && info.num_ack_pending == 0,
        "T-3 not delivered while removed: {info:?}"
    );
    assert!(
        seen(&bed, "T-3").await.is_empty(),
        "not handled while removed"
    );
    let events = events(&bed.js).await;
    let mut names = events.consumer_names();
    let mut kept = 0;
    while let Some(Ok(name)) = futures::StreamExt::next(&mut names).await {
        kept += usize::from(name.starts_with("handler_rec_"));
    }
    assert_eq!(kept, 16, "consumers kept without --delete-consumer");
    bed.ok(&["handlers", "rollback", "rec", "--to", "1"]);
    wait_for(Duration::from_secs(10), "handled once back", || async {
        seen(&bed, "T-3").await == [("k-3".to_string(), "a".to_string())]
    })
    .await;

    // Removed with its consumers: the running host does not bring them
    // back (which would replay the stream from its start).
    assert_eq!(host.owned("rec").await, 16, "the host works the handler");
    bed.ok(&["handlers", "remove", "rec", "--delete-consumer"]);
    // Once the host has handed every partition over and dropped the
    // version, nothing of the handler runs there that could make or bind
    // a consumer: what is on the server now stays.
    wait_for(Duration::from_secs(10), "the handler stopped", || async {
        host.owned("rec").await == 0
            && !host
                .admin_get("/metrics")
                .await
                .1
                .contains("handler_version{handler=\"rec\"")
    })
    .await;
    let mut names = events.consumer_names();
    let mut left = Vec::new();
    while let Some(Ok(name)) = futures::StreamExt::next(&mut names).await {
        left.push(name);
    }
    assert!(
        left.iter().all(|n| !n.starts_with("handler_rec_")),
        "{left:?}"
    );
    drop(host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_redeploys_a_handler_when_its_manifest_or_component_changes() {
    let bed = Bed::new().await;
    let dir = bed.dir.path().join("handlers");
    let rec_dir = dir.join("rec");
    std::fs::create_dir_all(&rec_dir).expect("mkdir");
    let component = rec_dir.join("rec.wasm");
    std::fs::copy(guest("fixture_recorder"), &component).expect("copy");
    let manifest = rec_dir.join("handler.toml");
    std::fs::write(&manifest, recorder_manifest("a", Some(&component))).expect("manifest");
    let cache = guest_cache_dir().display().to_string();
    let config = bed.config.display().to_string();
    let dir_arg = dir.display().to_string();
    let up = LoggedProcess::start(
        bed.dir.path(),
        &[
            "up",
            "--config",
            &config,
            "--handlers",
            &dir_arg,
            "--cache-dir",
            &cache,
        ],
        "up",
    )
    .await;
    let digest = |path: &Path| deploy::sha256_hex(&std::fs::read(path).expect("read"));
    let recorder = digest(&component);
    wait_version(&[&up], &format!("1-{}", &recorder[..12])).await;
    send_crm(&up.address, ticket("T-1", false), "u-1").await;
    wait_for(Duration::from_secs(10), "handled on tag a", || async {
        seen(&bed, "T-1").await == [("u-1".to_string(), "a".to_string())]
    })
    .await;

    // Edit the manifest: redeployed, the next event runs on it.
    std::fs::write(&manifest, recorder_manifest("b", Some(&component))).expect("manifest");
    wait_version(&[&up], &format!("2-{}", &recorder[..12])).await;
    send_crm(&up.address, ticket("T-1", false), "u-2").await;
    wait_for(Duration::from_secs(10), "handled on tag b", || async {
        seen(&bed, "T-1").await.last() == Some(&("u-2".to_string(), "b".to_string()))
    })
    .await;

    // Rebuild the component: redeployed under its new digest.
    std::fs::copy(guest("fixture_noop"), &component).expect("copy");
    let noop = digest(&component);
    wait_version(&[&up], &format!("3-{}", &noop[..12])).await;
    let history: BTreeMap<_, _> = bed
        .audit()
        .await
        .into_iter()
        .filter(|(_, r)| r.action == Action::Deploy && r.outcome == "ok")
        .map(|(_, r)| (r.version.unwrap_or_default(), r.actor))
        .collect();
    assert_eq!(history.len(), 3, "{history:?}");
}
