//! Partition ownership across `hookmesh serve` processes: the partitions
//! of a handler spread over the live hosts, move when a host stops or is
//! killed, and `hookmesh handlers show` tells who holds each.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::deploy::Bed;
use crate::support::*;

const PARTITIONS: u64 = 16;

fn recorder_manifest() -> String {
    // A short ack_wait keeps the takeover after a kill short.
    "name = \"rec\"\nsubject = \"crm.ticket.>\"\nmax_deliver = 5\nack_wait = \"3s\"\n\
     timeout = \"2s\"\n[backoff]\ninitial = \"100ms\"\nmax = \"200ms\"\n"
        .to_string()
}

/// Partition → the pid in the host id `handlers show` prints.
fn owners(show: &str) -> BTreeMap<u32, String> {
    show.lines()
        .skip_while(|l| !l.starts_with("PARTITION"))
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let partition = cols.first()?.parse().ok()?;
            let pid = cols.get(2)?.split(':').nth(1)?.to_string();
            Some((partition, pid))
        })
        .collect()
}

async fn wait_owned(hosts: &[(&LoggedProcess, u64)], limit: Duration, what: &str) {
    wait_for(limit, what, || async {
        for (host, want) in hosts {
            if host.owned("rec").await != *want {
                return false;
            }
        }
        true
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_spread_over_the_hosts_and_move_when_one_stops_or_dies() {
    let bed = Bed::new().await;
    let wasm = guest("fixture_recorder").display().to_string();
    let manifest = bed.file("rec.toml", recorder_manifest().as_bytes());
    bed.ok(&["deploy", &wasm, "--manifest", &manifest]);
    let cache = guest_cache_dir().display().to_string();
    let config = bed.config.display().to_string();
    let args = ["serve", "--config", &config, "--cache-dir", &cache];

    let one = LoggedProcess::start(bed.dir.path(), &args, "host-1").await;
    wait_owned(
        &[(&one, PARTITIONS)],
        Duration::from_secs(10),
        "one host holds all",
    )
    .await;
    let shown = owners(&bed.ok(&["handlers", "show", "rec"]));
    assert_eq!(shown.len(), PARTITIONS as usize, "a row per partition");
    assert!(
        shown.values().all(|pid| *pid == one.pid().to_string()),
        "{shown:?}"
    );

    // A second host takes about half within seconds.
    let mut two = LoggedProcess::start(bed.dir.path(), &args, "host-2").await;
    let joined = Instant::now();
    wait_owned(
        &[(&one, PARTITIONS / 2), (&two, PARTITIONS / 2)],
        Duration::from_secs(15),
        "the partitions split 8/8",
    )
    .await;
    eprintln!("split after {:?}", joined.elapsed());
    let shown = owners(&bed.ok(&["handlers", "show", "rec"]));
    let on_two = shown
        .values()
        .filter(|p| **p == two.pid().to_string())
        .count();
    let on_one = shown
        .values()
        .filter(|p| **p == one.pid().to_string())
        .count();
    assert_eq!(
        (on_one, on_two),
        (8, 8),
        "handlers show tells the truth: {shown:?}"
    );

    // Events flow while the partitions are split.
    for n in 0..20 {
        send_crm(
            &one.address,
            ticket(&format!("T-{}", n % 5)),
            &format!("t-{n}"),
        )
        .await;
    }
    wait_for(Duration::from_secs(10), "every event recorded", || async {
        let mut total = 0;
        for e in 0..5 {
            total += seen_count(&bed, &format!("T-{e}")).await;
        }
        total == 20
    })
    .await;

    // A clean stop hands the partitions over at once.
    two.stop();
    let stopped = Instant::now();
    wait_owned(
        &[(&one, PARTITIONS)],
        Duration::from_secs(5),
        "all back on host 1",
    )
    .await;
    eprintln!("handed over after {:?}", stopped.elapsed());

    // A killed host's partitions move within ack_wait + a few seconds.
    let mut three = LoggedProcess::start(bed.dir.path(), &args, "host-3").await;
    wait_owned(
        &[(&one, PARTITIONS / 2), (&three, PARTITIONS / 2)],
        Duration::from_secs(15),
        "split with host 3",
    )
    .await;
    three.kill();
    let killed = Instant::now();
    wait_owned(
        &[(&one, PARTITIONS)],
        Duration::from_secs(3 + 4 + 6),
        "host 1 takes over the killed host's partitions",
    )
    .await;
    eprintln!("taken over after {:?}", killed.elapsed());
    let shown = owners(&bed.ok(&["handlers", "show", "rec"]));
    assert!(
        shown.values().all(|pid| *pid == one.pid().to_string()),
        "{shown:?}"
    );
}

fn ticket(id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"type": "ticket.updated", "data": {"id": id}}))
        .expect("json")
}

async fn seen_count(bed: &Bed, entity: &str) -> usize {
    crate::handlers::state(&bed.js, "rec", &format!("seen/{entity}"))
        .await
        .map_or(0, |s| s.lines().count())
}

/// A ticket for entity `entity` that fails its first attempt when `flaky`.
fn flaky_ticket(entity: &str, flaky: bool) -> Vec<u8> {
    let mut body = serde_json::json!({"type": "ticket.updated", "data": {"id": entity}});
    if flaky {
        body["fail_until_attempt"] = serde_json::json!(1);
    }
    serde_json::to_vec(&body).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_under_fire_kill_restart_join_and_leave() {
    const ENTITIES: usize = 50;
    const VERSIONS: usize = 20;
    let bed = Bed::new().await;
    let wasm = guest("fixture_recorder").display().to_string();
    let manifest = bed.file("rec.toml", recorder_manifest().as_bytes());
    bed.ok(&["deploy", &wasm, "--manifest", &manifest]);
    let cache = guest_cache_dir().display().to_string();
    let config = bed.config.display().to_string();
    let args = ["serve", "--config", &config, "--cache-dir", &cache];
    let a = LoggedProcess::start(bed.dir.path(), &args, "host-a").await;
    let mut b = LoggedProcess::start(bed.dir.path(), &args, "host-b").await;
    let mut c = LoggedProcess::start(bed.dir.path(), &args, "host-c").await;
    wait_for(
        Duration::from_secs(20),
        "three hosts share the partitions",
        || async {
            let owned = [
                a.owned("rec").await,
                b.owned("rec").await,
                c.owned("rec").await,
            ];
            owned.iter().all(|n| *n > 0) && owned.iter().sum::<u64>() == PARTITIONS
        },
    )
    .await;

    // Versions go out round by round (every entity's version n, then
    // n + 1), through host a, which stays up; about 3 in 10 events fail
    // their first attempt.
    let address = a.address.clone();
    let sender = tokio::spawn(async move {
        for n in 0..VERSIONS {
            for e in 0..ENTITIES {
                let flaky = (e * 7 + n * 13) % 10 < 3;
                send_crm(
                    &address,
                    flaky_ticket(&format!("E{e:02}"), flaky),
                    &format!("E{e:02}-{n:02}"),
                )
                .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let c2 = LoggedProcess::start(bed.dir.path(), &args, "host-c2").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let d = LoggedProcess::start(bed.dir.path(), &args, "host-d").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    b.stop();
    sender.await.expect("sender");

    wait_for(Duration::from_secs(90), "every event handled", || async {
        let mut done = 0;
        for e in 0..ENTITIES {
            let seen = seen_ids(&bed, &format!("E{e:02}")).await;
            done += usize::from(distinct_in_a_row(&seen).len() == VERSIONS);
        }
        done == ENTITIES
    })
    .await;
    let mut duplicates = 0;
    for e in 0..ENTITIES {
        let entity = format!("E{e:02}");
        let seen = seen_ids(&bed, &entity).await;
        let expected: Vec<String> = (0..VERSIONS).map(|n| format!("{entity}-{n:02}")).collect();
        // A run again right after itself (its host died before the ack)
        // is a duplicate, never a reordering.
        assert_eq!(
            distinct_in_a_row(&seen),
            expected,
            "{entity}: in order and complete: {seen:?}"
        );
        duplicates += seen.len() - VERSIONS;
    }
    eprintln!("{duplicates} events handled twice (in flight on the killed host)");
    assert!(duplicates <= 100, "{duplicates} duplicates");
    let owned = [
        a.owned("rec").await,
        c2.owned("rec").await,
        d.owned("rec").await,
    ];
    assert_eq!(
        owned.iter().sum::<u64>(),
        PARTITIONS,
        "the live hosts hold every partition: {owned:?}"
    );
}

async fn seen_ids(bed: &Bed, entity: &str) -> Vec<String> {
    crate::handlers::state(&bed.js, "rec", &format!("seen/{entity}"))
        .await
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// `seen` without repeats in a row.
fn distinct_in_a_row(seen: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for id in seen {
        if out.last() != Some(id) {
            out.push(id.clone());
        }
    }
    out
}
