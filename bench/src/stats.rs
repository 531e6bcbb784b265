//! Figures of a measured run (rate, latency percentiles, failures) and the
//! two ways they are printed: a table for people and one JSON line for
//! scripts. Shared by every scenario so they all read the same way.

use std::time::Duration;

use serde::Serialize;

use crate::load::Run;

/// How many distinct failure messages are kept to show; the rest are only
/// counted (a broken run fails the same way thousands of times).
const FAILURE_SAMPLES: usize = 5;

/// Whether a scenario's figures can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every operation succeeded; the JSON line was printed.
    Clean,
    /// Some operations failed; no JSON line was printed.
    Failed,
}

/// One measured side of a scenario: a row of the table.
#[derive(Debug)]
pub struct Measured {
    /// What was measured, as the table shows it.
    pub label: String,
    /// Operations attempted.
    pub messages: usize,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// Operations that did not succeed.
    pub errors: usize,
    /// A few distinct failure messages, first seen first.
    pub samples: Vec<String>,
    /// Per-operation latencies, sorted ascending (for percentiles).
    latencies: Vec<Duration>,
}

impl Measured {
    /// Summarises a [`Run`] under `label`.
    pub fn from_run(label: impl Into<String>, run: Run) -> Self {
        let mut latencies = run.latencies;
        latencies.sort_unstable();
        let mut errors = 0;
        let mut samples: Vec<String> = Vec::new();
        for failure in run.failures.into_iter().flatten() {
            errors += 1;
            if samples.len() < FAILURE_SAMPLES && !samples.contains(&failure) {
                samples.push(failure);
            }
        }
        Measured {
            label: label.into(),
            messages: latencies.len(),
            elapsed: run.elapsed,
            errors,
            samples,
            latencies,
        }
    }

    /// Operations per second over the whole run.
    pub fn rate(&self) -> f64 {
        rate(self.messages, self.elapsed)
    }

    /// The `p`th latency percentile (0–100) in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        percentile(&self.latencies, p).as_secs_f64() * 1e3
    }
}

/// Operations per second; 0 for an empty or instantaneous run rather than
/// infinity, so a broken run cannot print a heroic figure.
pub fn rate(count: usize, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if count == 0 || seconds <= 0.0 {
        0.0
    } else {
        count as f64 / seconds
    }
}

/// The nearest-rank `p`th percentile (0–100) of ascending `sorted` values:
/// always a latency that was actually observed, never an interpolation.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `value` rounded to `decimals` places, so the JSON line carries figures
/// and not float noise.
pub fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// Prints the table of `rows` under `title`.
pub fn print_table(title: &str, rows: &[Measured]) {
    let width = (rows.iter())
        .map(|r| r.label.chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    println!("{title}");
    println!(
        "{:<width$}  {:>9}  {:>8}  {:>11}  {:>8}  {:>8}  {:>6}",
        "side", "messages", "seconds", "rate msg/s", "p50 ms", "p99 ms", "errors"
    );
    for row in rows {
        println!(
            "{:<width$}  {:>9}  {:>8.3}  {:>11.1}  {:>8.3}  {:>8.3}  {:>6}",
            row.label,
            row.messages,
            row.elapsed.as_secs_f64(),
            row.rate(),
            row.percentile_ms(50.0),
            row.percentile_ms(99.0),
            row.errors,
        );
    }
}

/// Says loudly, on stdout and stderr, which rows had failures. Returns
/// [`Verdict::Failed`] if any did: the caller then prints no JSON line, so a
/// script can never pick up figures of a broken run.
pub fn report_failures(rows: &[Measured]) -> Verdict {
    let failed: Vec<&Measured> = rows.iter().filter(|r| r.errors > 0).collect();
    if failed.is_empty() {
        return Verdict::Clean;
    }
    for row in &failed {
        let mut text = format!(
            "!!! BENCH RUN FAILED: {} of {} operations of \"{}\" failed",
            row.errors, row.messages, row.label
        );
        for sample in &row.samples {
            text.push_str(&format!("\n!!!   e.g. {sample}"));
        }
        eprintln!("{text}");
        println!("{text}");
    }
    println!("!!! BENCH RUN FAILED: figures above are not valid; no JSON line printed");
    Verdict::Failed
}

/// Prints `value` as one line of JSON: the last line a scenario prints.
pub fn print_json_line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Progress goes to stderr: stdout is the table and the JSON line.
pub fn progress(what: &str) {
    eprintln!("hookmesh-bench: {what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn percentiles_are_observed_values() {
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&sorted, 50.0), ms(50));
        assert_eq!(percentile(&sorted, 99.0), ms(99));
        assert_eq!(percentile(&sorted, 100.0), ms(100));
        assert_eq!(percentile(&sorted, 0.0), ms(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        assert_eq!(percentile(&[ms(7)], 99.0), ms(7));
    }

    #[test]
    fn rates_never_divide_by_zero() {
        assert_eq!(rate(10, Duration::ZERO), 0.0);
        assert_eq!(rate(0, ms(5)), 0.0);
        assert_eq!(rate(500, ms(250)), 2000.0);
    }

    #[test]
    fn failures_are_counted_and_sampled_once() {
        let run = Run {
            elapsed: ms(10),
            latencies: vec![ms(3), ms(1), ms(2)],
            failures: vec![None, Some("503".into()), Some("503".into())],
        };
        let m = Measured::from_run("x", run);
        assert_eq!((m.messages, m.errors), (3, 2));
        assert_eq!(m.samples, vec!["503".to_string()]);
        assert_eq!(m.percentile_ms(50.0), 2.0);
        assert_eq!(report_failures(&[m]), Verdict::Failed);
    }
}
