//! Changing a stream's replica count on a running system (R1 → R3 when a
//! single server grows into a cluster, or back).
//!
//! The server accepts the new count at once and copies the stream to the
//! new peers in the background. Until they hold everything, the stream is
//! still as fragile as before — a node lost in that window can lose what
//! only the old replica had — so a rescale is reported done only when the
//! stream's cluster info lists every replica `current`, online and with no
//! lag. The stream's durable consumers (the handlers' partition consumers)
//! follow it: the server moves each onto the stream's new peers, copying its
//! state (delivered and acked positions) — and until that copy is current
//! on the new peers, losing the old node would restart the consumer from
//! an earlier position. So a rescale is done only when every durable
//! consumer of the stream is current on the new count too.

use std::time::{Duration, Instant};

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::ClusterInfo;
use async_nats::jetstream::{self, stream};
use futures::TryStreamExt;

use super::StreamsError;

/// How long new replicas may take to catch up before `streams apply`
/// gives up (the stream stays rescaled; running it again waits again).
pub const CATCH_UP_LIMIT: Duration = Duration::from_secs(300);

/// What one look at a stream's replicas found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replication {
    /// Every replica is there, current and without lag.
    Current,
    /// Not yet: why (for the log and the final error).
    Behind(String),
}

/// The first nats-server release that keeps a durable consumer's
/// positions when its stream grows while the consumer is in use.
const SAFE_GROWTH_FROM: (u64, u64) = (2, 10);

/// Refuses to grow streams on a nats-server before 2.10 while hosts work
/// handlers. Such a server moves each durable consumer onto the stream's
/// new peers without its delivered and acked positions when the consumer
/// is in use: measured here on 2.9.10 (`tests/e2e/cluster.rs`), a node
/// killed after the change made 1 021 of 1 165 events run again, against 1
/// of 1 558 on 2.15.1 — at least once still, but a flood of runs again. With
/// no host running, the consumers are idle and keep their positions.
pub async fn check_growth_is_safe(js: &jetstream::Context) -> Result<(), StreamsError> {
    let version = js.client().server_info().version;
    if grows_consumers_safely(&version) {
        return Ok(());
    }
    let leases = match js.get_key_value(crate::streams::LEASES_BUCKET).await {
        Ok(leases) => leases,
        // No bucket yet: no host has ever worked a handler.
        Err(_) => return Ok(()),
    };
    let hosts = crate::dispatch::ownership::live_hosts(&leases)
        .await
        .map_err(|e| StreamsError::Server {
            stream: format!("KV_{}", crate::streams::LEASES_BUCKET),
            message: format!("reading which hosts run: {e}"),
        })?;
    if hosts.is_empty() {
        return Ok(());
    }
    Err(StreamsError::Refused(format!(
        "not growing the streams: nats-server {version} loses the handlers' consumer positions \
         when a stream grows while hosts consume it (every event would run again), and {} \
         host(s) run now ({}). Stop the hosts (`hookmesh serve`), run `hookmesh streams apply` \
         again, then start them; or upgrade nats-server to 2.10 or later. See \
         docs/scale-out.md",
        hosts.len(),
        hosts.join(", ")
    )))
}

/// Whether nats-server `version` ("2.9.10", "v2.15.1") keeps consumer
/// positions when a stream grows under use; an unreadable version is
/// taken as not.
pub fn grows_consumers_safely(version: &str) -> bool {
    at_least(version, SAFE_GROWTH_FROM)
}

/// Whether nats-server `version` ("2.9.10", "v2.15.1") is `(major, minor)`
/// or later; an unreadable version is not.
pub fn at_least(version: &str, (major, minor): (u64, u64)) -> bool {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    let mut next = || parts.next().and_then(|p| p.parse::<u64>().ok());
    match (next(), next()) {
        (Some(has_major), Some(has_minor)) => (has_major, has_minor) >= (major, minor),
        _ => false,
    }
}

/// Updates `wanted` (whose `num_replicas` differs from the stream's
/// `from`) and waits until its replicas are current.
pub async fn rescale(
    js: &jetstream::Context,
    wanted: stream::Config,
    from: usize,
) -> Result<(), StreamsError> {
    let name = wanted.name.clone();
    let to = wanted.num_replicas;
    let server = |e: &dyn std::fmt::Display| StreamsError::Server {
        stream: name.clone(),
        message: e.to_string(),
    };
    // Only a stream whose own replicas are all current may change: scaling
    // a stream that is still catching up stacks one copy onto another.
    wait_current(js, &name, from, CATCH_UP_LIMIT).await?;
    tracing::info!(stream = %name, from, to, "changing the replica count");
    js.update_stream(wanted).await.map_err(|e| server(&e))?;
    wait_current(js, &name, to, CATCH_UP_LIMIT).await?;
    wait_consumers_current(js, &name, to, CATCH_UP_LIMIT).await?;
    tracing::info!(stream = %name, replicas = to, "every replica is current, consumers included");
    Ok(())
}

/// Waits until every durable consumer of stream `name` has `replicas`
/// replicas, all current. Ephemeral consumers (watchers, which their
/// clients recreate) stay where they are and are not waited for; a consumer
/// deleted meanwhile is skipped.
pub async fn wait_consumers_current(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    limit: Duration,
) -> Result<(), StreamsError> {
    let server = |message: String| StreamsError::Server {
        stream: name.to_string(),
        message,
    };
    let stream = js
        .get_stream(name)
        .await
        .map_err(|e| server(e.to_string()))?;
    let names: Vec<String> = stream
        .consumer_names()
        .try_collect()
        .await
        .map_err(|e| server(format!("listing its consumers: {e}")))?;
    let deadline = Instant::now() + limit;
    for consumer in names {
        until_current(deadline, || async {
            match stream.consumer_info(&consumer).await {
                Ok(info) if info.config.durable_name.is_none() => Replication::Current,
                Ok(info) => peers(info.cluster.as_ref(), replicas),
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => Replication::Current,
                Err(e) => Replication::Behind(e.to_string()),
            }
        })
        .await
        .map_err(|last| {
            server(format!(
                "consumer {consumer}: its {replicas} replica(s) did not become current \
                 within {limit:?} ({last}); check `nats consumer info {name} {consumer}` \
                 and run `hookmesh streams apply` again"
            ))
        })?;
    }
    Ok(())
}

/// Looks with `look` every 250 ms until it says `Current`; past `deadline`,
/// the last reason it gave for not being current.
async fn until_current<F, Fut>(deadline: Instant, mut look: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Replication>,
{
    loop {
        let last = match look().await {
            Replication::Current => return Ok(()),
            Replication::Behind(why) => why,
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until [`replication`] says `Current` for `replicas` replicas.
pub async fn wait_current(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    limit: Duration,
) -> Result<(), StreamsError> {
    until_current(Instant::now() + limit, || async {
        match js.get_stream(name).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => replication(info, replicas),
                Err(e) => Replication::Behind(e.to_string()),
            },
            Err(e) => Replication::Behind(e.to_string()),
        }
    })
    .await
    .map_err(|last| StreamsError::Server {
        stream: name.to_string(),
        message: format!(
            "its {replicas} replica(s) did not become current within {limit:?} ({last}); \
             check `nats stream info {name}` and run `hookmesh streams apply` again"
        ),
    })
}

/// Whether a stream's `replicas` replicas are all there and current.
pub fn replication(info: &stream::Info, replicas: usize) -> Replication {
    if info.config.num_replicas.max(1) != replicas {
        return Replication::Behind(format!(
            "it has {} replica(s), not {replicas}",
            info.config.num_replicas
        ));
    }
    peers(info.cluster.as_ref(), replicas)
}

/// Whether a stream's or consumer's cluster info shows `replicas` replicas:
/// a leader and `replicas - 1` followers, each current, online and without
/// lag.
fn peers(cluster: Option<&ClusterInfo>, replicas: usize) -> Replication {
    if replicas <= 1 {
        return Replication::Current;
    }
    let Some(cluster) = cluster else {
        return Replication::Behind("no cluster info (is the server clustered?)".into());
    };
    if cluster.leader.as_deref().is_none_or(str::is_empty) {
        return Replication::Behind("no leader".into());
    }
    let followers = replicas - 1;
    if cluster.replicas.len() < followers {
        return Replication::Behind(format!(
            "{} of {followers} follower(s) placed",
            cluster.replicas.len()
        ));
    }
    let behind: Vec<String> = (cluster.replicas.iter())
        .filter(|p| !p.current || p.offline || p.lag.unwrap_or(0) > 0)
        .map(|p| {
            format!(
                "{} (current {}, offline {}, lag {})",
                p.name,
                p.current,
                p.offline,
                p.lag.unwrap_or(0)
            )
        })
        .collect();
    if behind.is_empty() {
        Replication::Current
    } else {
        Replication::Behind(format!("behind: {}", behind.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(json: &str) -> stream::Info {
        serde_json::from_str(json).expect("stream info")
    }

    const BASE: &str = r#""config":{"name":"S","subjects":["s"],"num_replicas":3,"retention":"limits","max_consumers":-1,"max_msgs":-1,"max_bytes":-1,"max_age":0,"max_msgs_per_subject":-1,"max_msg_size":-1,"discard":"old","storage":"file","duplicate_window":120000000000},"created":"2026-01-01T00:00:00Z","state":{"messages":0,"bytes":0,"first_seq":0,"first_ts":"0001-01-01T00:00:00Z","last_seq":0,"last_ts":"0001-01-01T00:00:00Z","consumer_count":0}"#;

    #[test]
    fn current_only_when_every_follower_is_current_online_and_without_lag() {
        let cluster = |replicas: &str| {
            info(&format!(
                r#"{{{BASE},"cluster":{{"name":"c","leader":"n1","replicas":[{replicas}]}}}}"#
            ))
        };
        let peer = |name: &str, current: bool, lag: u64| {
            format!(r#"{{"name":"{name}","current":{current},"active":1000,"lag":{lag}}}"#)
        };
        let both = format!("{},{}", peer("n2", true, 0), peer("n3", true, 0));
        assert_eq!(replication(&cluster(&both), 3), Replication::Current);
        let lagging = format!("{},{}", peer("n2", true, 0), peer("n3", true, 12));
        assert!(
            matches!(replication(&cluster(&lagging), 3), Replication::Behind(w) if w.contains("n3"))
        );
        let stale = format!("{},{}", peer("n2", false, 0), peer("n3", true, 0));
        assert!(matches!(
            replication(&cluster(&stale), 3),
            Replication::Behind(_)
        ));
        let one = peer("n2", true, 0);
        assert!(
            matches!(replication(&cluster(&one), 3), Replication::Behind(w) if w.contains("1 of 2"))
        );
        assert!(
            matches!(replication(&cluster(&both), 1), Replication::Behind(w) if w.contains("not 1"))
        );
    }

    #[test]
    fn growth_under_use_is_safe_from_nats_server_2_10() {
        assert!(!grows_consumers_safely("2.9.10"));
        assert!(!grows_consumers_safely("v2.9.25"));
        assert!(grows_consumers_safely("2.10.0"));
        assert!(grows_consumers_safely("v2.15.1"));
        assert!(grows_consumers_safely("3.0.0-beta"));
        assert!(!grows_consumers_safely("unknown"));
    }

    #[test]
    fn a_consumer_moved_onto_new_peers_is_current_once_every_follower_is() {
        // A durable consumer's cluster info as nats-server 2.9 reports it
        // after its stream went R1 -> R3 (no `lag` field).
        let cluster = |replicas: &str| -> ClusterInfo {
            serde_json::from_str(&format!(
                r#"{{"name":"hookmesh","leader":"n1","replicas":[{replicas}]}}"#
            ))
            .expect("cluster info")
        };
        let moved =
            r#"{"name":"n2","current":true,"active":1},{"name":"n3","current":true,"active":1}"#;
        assert_eq!(peers(Some(&cluster(moved)), 3), Replication::Current);
        assert!(matches!(
            peers(Some(&cluster("")), 3),
            Replication::Behind(w) if w.contains("0 of 2")
        ));
        let copying =
            r#"{"name":"n2","current":false,"active":1},{"name":"n3","current":true,"active":1}"#;
        assert!(matches!(
            peers(Some(&cluster(copying)), 3),
            Replication::Behind(w) if w.contains("n2")
        ));
        assert_eq!(peers(None, 1), Replication::Current, "R1 has no followers");
    }
}
