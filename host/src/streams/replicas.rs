//! Changing a stream's replica count on a running system (R1 → R3 when a
//! single server grows into a cluster, or back).
//!
//! The server accepts the new count at once and copies the stream to the
//! new peers in the background. Until they hold everything, the stream is
//! still as fragile as before — a node lost in that window can lose what
//! only the old replica had — so a rescale is reported done only when the
//! stream's cluster info lists every replica `current`, online and with no
//! lag.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};

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
    tracing::info!(stream = %name, replicas = to, "every replica is current");
    Ok(())
}

/// Waits until [`replication`] says `Current` for `replicas` replicas.
pub async fn wait_current(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    limit: Duration,
) -> Result<(), StreamsError> {
    let deadline = Instant::now() + limit;
    let mut last;
    loop {
        match js.get_stream(name).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => match replication(info, replicas) {
                    Replication::Current => return Ok(()),
                    Replication::Behind(why) => last = why,
                },
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(StreamsError::Server {
                stream: name.to_string(),
                message: format!(
                    "its {replicas} replica(s) did not become current within {limit:?} ({last}); \
                     check `nats stream info {name}` and run `hookmesh streams apply` again"
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether a stream's `replicas` replicas are all there and current.
pub fn replication(info: &stream::Info, replicas: usize) -> Replication {
    if info.config.num_replicas.max(1) != replicas {
        return Replication::Behind(format!(
            "it has {} replica(s), not {replicas}",
            info.config.num_replicas
        ));
    }
    if replicas == 1 {
        return Replication::Current;
    }
    let Some(cluster) = &info.cluster else {
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
}
