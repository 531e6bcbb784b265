//! A closed-loop load driver: a fixed number of workers, each keeping exactly
//! one operation in flight, working through a finite list of jobs.
//!
//! Closed loop (rather than a fixed arrival rate) is what "concurrency C"
//! means in the scenarios: C operations are outstanding at all times, so the
//! rate measured is what the system sustains at that depth. Jobs are built
//! before the clock starts, so preparing them (signing, encoding) is never
//! counted against the system under test.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// What one [`closed_loop`] run measured.
#[derive(Debug)]
pub struct Run {
    /// Wall time from the first job started to the last one finished.
    pub elapsed: Duration,
    /// Each job's own latency, start of the operation to its outcome.
    pub latencies: Vec<Duration>,
    /// Each job's failure, if it failed: `None` is success.
    pub failures: Vec<Option<String>>,
}

/// Runs `op` on every job with `concurrency` operations in flight, and
/// returns once every job is done (the list is finite, so this always ends;
/// `op` itself must be bounded, e.g. by a client timeout).
///
/// Workers are separate tasks rather than one `FuturesUnordered`, so the
/// client side spreads over the runtime's threads like real callers would.
pub async fn closed_loop<J, F, Fut>(jobs: Vec<J>, concurrency: usize, op: F) -> anyhow::Result<Run>
where
    J: Send + 'static,
    F: Fn(J) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let total = jobs.len();
    let queue = Arc::new(Mutex::new(jobs.into_iter()));
    let op = Arc::new(op);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.clamp(1, total.max(1)) {
        let queue = Arc::clone(&queue);
        let op = Arc::clone(&op);
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = Vec::new();
            loop {
                // The lock is held only to pop the next job, never across an
                // await; a poisoned lock cannot happen (popping cannot panic)
                // but would simply end this worker.
                let next = queue.lock().ok().and_then(|mut jobs| jobs.next());
                let Some(job) = next else { break };
                let begun = Instant::now();
                let outcome = op(job).await;
                latencies.push(begun.elapsed());
                failures.push(outcome.err());
            }
            (latencies, failures)
        });
    }
    let mut latencies = Vec::with_capacity(total);
    let mut failures = Vec::with_capacity(total);
    while let Some(joined) = workers.join_next().await {
        let (mut l, mut f) = joined.context("a load worker panicked")?;
        latencies.append(&mut l);
        failures.append(&mut f);
    }
    Ok(Run {
        elapsed: started.elapsed(),
        latencies,
        failures,
    })
}

/// [`closed_loop`] for a timed run: summarised under `label`, and its start
/// and end announced on stderr so external profilers (`perf`, CPU samplers)
/// can be lined up with the figures.
pub async fn timed<J, F, Fut>(
    label: &str,
    jobs: Vec<J>,
    concurrency: usize,
    op: F,
) -> anyhow::Result<crate::stats::Measured>
where
    J: Send + 'static,
    F: Fn(J) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    eprintln!("hookmesh-bench: timing {}", label.trim());
    let run = closed_loop(jobs, concurrency, op).await?;
    eprintln!("hookmesh-bench: timed {}", label.trim());
    Ok(crate::stats::Measured::from_run(label, run))
}
