//! `hookmesh dlq list | show | replay | purge`: the command line's face on
//! the dead-letter queue (the binary's edge, so errors are `anyhow`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use async_nats::jetstream;
use bytes::Bytes;

use super::replay::{self, ReplayOutcome, ReplayRequest};
use super::store::{self, Selection};
use super::{DeadLetter, DlqError, DlqReason};
use crate::audit::{self, Action, AuditRecord, DeadLetterRef};
use crate::records::attempts;
use crate::records::park;
use crate::streams::ATTEMPTS_BUCKET;

/// How long a replay may take before the CLI stops waiting.
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(60);

/// Checks a `--reason` value.
pub fn check_reason(reason: &str) -> anyhow::Result<()> {
    if DlqReason::parse(reason).is_none() {
        let known: Vec<_> = DlqReason::ALL.iter().map(|r| r.as_str()).collect();
        bail!("unknown reason {reason:?}; one of {}", known.join(", "));
    }
    Ok(())
}

/// `dlq list`: a table of the selected entries, oldest first.
pub async fn list(js: &jetstream::Context, selection: &Selection) -> anyhow::Result<()> {
    let entries = store::list(js, selection).await?;
    if entries.is_empty() {
        println!("no dead letters{}", describe(selection));
        return Ok(());
    }
    let now = SystemTime::now();
    println!(
        "{:>8}  {:>6}  {:<20}  {:<14}  {:>8}  {:<48}  ERROR",
        "SEQ", "AGE", "HANDLER", "REASON", "ATTEMPTS", "SUBJECT"
    );
    for entry in &entries {
        println!(
            "{:>8}  {:>6}  {:<20}  {:<14}  {:>8}  {:<48}  {}",
            entry.dlq_seq,
            age(now, entry.stored_at),
            entry.handler,
            entry.reason,
            entry.attempts,
            entry.subject,
            shorten(&entry.error, 60)
        );
    }
    println!("{} dead letter(s){}", entries.len(), describe(selection));
    Ok(())
}

/// `dlq show SEQ`: everything about one entry.
pub async fn show(js: &jetstream::Context, seq: u64) -> anyhow::Result<()> {
    let entry = store::get(js, seq).await?;
    let now = SystemTime::now();
    println!(
        "dead letter {} ({} old)",
        entry.dlq_seq,
        age(now, entry.stored_at)
    );
    println!(
        "  handler        {} (version {})",
        entry.handler, entry.handler_version
    );
    println!("  reason         {}", entry.reason);
    println!("  attempts       {}", entry.attempts);
    println!("  first failure  {}", entry.first_failure);
    println!("  last failure   {}", entry.last_failure);
    println!(
        "  event          {} (HOOK_EVENTS seq {})",
        entry.subject, entry.stream_seq
    );
    println!("  error          {}", entry.error);
    println!("headers:");
    for (name, values) in entry.headers.iter() {
        for value in values {
            println!("  {name}: {}", value.as_str());
        }
    }
    println!("payload ({} bytes):", entry.payload.len());
    println!("{}", pretty(&entry.payload));
    Ok(())
}

/// What a replay or purge applies to.
#[derive(Debug, Clone)]
pub enum Target {
    /// These entries.
    Seqs(Vec<u64>),
    /// The entries a selection picks.
    Selected(Selection),
}

impl Target {
    /// The entries `seqs`, or with `handler` that handler's entries which
    /// `selection` picks.
    pub fn new(seqs: Vec<u64>, handler: Option<String>, selection: Selection) -> Target {
        match handler {
            Some(handler) => Target::Selected(Selection {
                handler: Some(handler),
                ..selection
            }),
            None => Target::Seqs(seqs),
        }
    }
}

async fn targets(js: &jetstream::Context, target: &Target) -> anyhow::Result<Vec<DeadLetter>> {
    match target {
        Target::Seqs(seqs) => {
            let mut entries = Vec::with_capacity(seqs.len());
            for &seq in seqs {
                entries.push(store::get(js, seq).await?);
            }
            Ok(entries)
        }
        // In event order, so an entity's dead letters replay as they
        // happened, not as they failed.
        Target::Selected(selection) => {
            let mut entries = store::list(js, selection).await?;
            entries.sort_by_key(|e| e.stream_seq);
            Ok(entries)
        }
    }
}

/// `dlq replay`: runs each entry through its handler's current version on
/// a running host. Fails (exit non-zero) when any replay failed.
pub async fn replay(
    client: &async_nats::Client,
    target: &Target,
    payload_file: Option<&Path>,
    dry_run: bool,
    actor: &str,
) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let payload = match payload_file {
        Some(path) => {
            Some(Bytes::from(std::fs::read(path).with_context(|| {
                format!("cannot read {}", path.display())
            })?))
        }
        None => None,
    };
    let entries = targets(&js, target).await?;
    if entries.is_empty() {
        println!("nothing to replay");
        return Ok(());
    }
    if payload.is_some() && entries.len() > 1 {
        bail!(
            "--payload replaces one event's payload: give exactly one dead letter, not {}",
            entries.len()
        );
    }
    if dry_run {
        for entry in &entries {
            println!(
                "would replay {} ({} {}, {}){}",
                entry.dlq_seq,
                entry.handler,
                entry.reason,
                entry.subject,
                if payload.is_some() {
                    " with the fixed payload"
                } else {
                    ""
                }
            );
        }
        println!(
            "{} dead letter(s) would be replayed (dry run)",
            entries.len()
        );
        return Ok(());
    }
    let mut failed = 0;
    for entry in &entries {
        match replay_entry(client, entry, payload.clone(), actor).await {
            Ok(outcome) if outcome.ok => println!(
                "replayed {} on {} version {}: ok, entry removed{}",
                entry.dlq_seq,
                entry.handler,
                outcome.version,
                if outcome.released {
                    "; the entity's parked events are released"
                } else {
                    ""
                }
            ),
            Ok(outcome) => {
                failed += 1;
                println!(
                    "replayed {} on {} version {}: failed: {}; kept as entry {}",
                    entry.dlq_seq,
                    entry.handler,
                    outcome.version,
                    outcome.error.as_deref().unwrap_or("?"),
                    outcome
                        .new_dlq_seq
                        .map_or_else(|| entry.dlq_seq.to_string(), |s| s.to_string())
                );
            }
            Err(error) => {
                failed += 1;
                println!("replay of {} not done: {error}", entry.dlq_seq);
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} replay(s) did not succeed", entries.len());
    }
    Ok(())
}

/// Runs one dead letter through its handler's current version on a running
/// host (`payload` in place of the stored one for this replay only), as
/// `actor`; the host settles and audits it. The CLI and the console both
/// replay through here.
pub async fn replay_entry(
    client: &async_nats::Client,
    entry: &DeadLetter,
    payload: Option<Bytes>,
    actor: &str,
) -> Result<ReplayOutcome, DlqError> {
    let request = ReplayRequest {
        dlq_seq: entry.dlq_seq,
        actor: actor.to_string(),
        payload,
    };
    replay::request(client, &entry.handler, &request, REPLAY_TIMEOUT).await
}

/// `dlq purge`: deletes entries after confirmation, releases the entities
/// they parked, and audits it.
pub async fn purge(
    js: &jetstream::Context,
    target: &Target,
    yes: bool,
    actor: &str,
) -> anyhow::Result<()> {
    let entries = targets(js, target).await?;
    if entries.is_empty() {
        println!("nothing to purge");
        return Ok(());
    }
    for entry in &entries {
        println!(
            "{:>8}  {:<20}  {:<14}  {}",
            entry.dlq_seq, entry.handler, entry.reason, entry.subject
        );
    }
    if !yes && !confirm(&format!("Delete these {} dead letter(s)?", entries.len()))? {
        bail!("nothing purged");
    }
    let report = purge_entries(js, &entries, actor).await?;
    for (seq, error) in &report.failed {
        println!("{seq:>8}  not purged: {error}");
    }
    println!("purged {} dead letter(s)", report.purged.len());
    if !report.failed.is_empty() {
        let seqs: Vec<u64> = report.failed.iter().map(|(seq, _)| *seq).collect();
        bail!("{} dead letter(s) not purged: {seqs:?}", seqs.len());
    }
    Ok(())
}

/// What [`purge_entries`] did.
#[derive(Debug, Default)]
pub struct PurgeReport {
    /// The entries deleted.
    pub purged: Vec<u64>,
    /// The entries not deleted, and why.
    pub failed: Vec<(u64, String)>,
}

/// Deletes `entries` (each claimed meanwhile, so a replay running on it is
/// not raced), releases the entities they parked, and writes one audit
/// record per handler for what was purged — also when some were not. The
/// CLI and the console both purge through here.
pub async fn purge_entries(
    js: &jetstream::Context,
    entries: &[DeadLetter],
    actor: &str,
) -> anyhow::Result<PurgeReport> {
    let bucket = js
        .get_key_value(ATTEMPTS_BUCKET)
        .await
        .with_context(|| format!("KV bucket {ATTEMPTS_BUCKET}"))?;
    let mut by_handler: std::collections::BTreeMap<&str, Vec<DeadLetterRef>> = Default::default();
    let mut report = PurgeReport::default();
    for entry in entries {
        // Claimed, so a replay running on it now is not raced.
        let who = format!("a purge by {actor}");
        let purged = match store::claim(&bucket, entry.dlq_seq, &who).await {
            Ok(()) => {
                let purged = purge_one(js, &bucket, entry).await;
                store::unclaim(&bucket, entry.dlq_seq).await;
                purged
            }
            Err(error) => Err(error.into()),
        };
        match purged {
            Ok(()) => {
                report.purged.push(entry.dlq_seq);
                by_handler
                    .entry(&entry.handler)
                    .or_default()
                    .push(DeadLetterRef {
                        dlq_seq: entry.dlq_seq,
                        stream_seq: entry.stream_seq,
                        subject: entry.subject.clone(),
                    });
            }
            Err(error) => report.failed.push((entry.dlq_seq, format!("{error:#}"))),
        }
    }
    for (handler, refs) in by_handler {
        let mut record = AuditRecord::new(Action::Purge, actor, handler, "ok");
        record.entries = refs;
        audit::write(js, &record).await?;
    }
    Ok(report)
}

/// Resolves, deletes and releases one entry (resolved first: an advisory
/// read again in between must find it resolved).
async fn purge_one(
    js: &jetstream::Context,
    bucket: &async_nats::jetstream::kv::Store,
    entry: &DeadLetter,
) -> anyhow::Result<()> {
    attempts::resolve(
        bucket,
        &entry.handler,
        entry.stream_seq,
        &entry.subject,
        "purged",
    )
    .await
    .map_err(|e| anyhow::anyhow!("marking it purged: {e}"))?;
    store::delete(js, entry.dlq_seq).await?;
    park::release(bucket, &entry.handler, &entry.subject, entry.stream_seq)
        .await
        .context("releasing its entity")?;
    Ok(())
}

/// Asks on the terminal; refuses when there is no one to ask.
fn confirm(question: &str) -> anyhow::Result<bool> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("{question} — not asked: stdin is not a terminal; pass --yes to confirm");
    }
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn describe(selection: &Selection) -> String {
    let mut parts = Vec::new();
    if let Some(h) = &selection.handler {
        parts.push(format!("handler {h}"));
    }
    if let Some(r) = &selection.reason {
        parts.push(format!("reason {r}"));
    }
    if let Some(e) = &selection.entity {
        parts.push(format!("entity {e}"));
    }
    if let Some(s) = selection.since {
        parts.push(format!("since {}", humantime::format_duration(s)));
    }
    if let Some(o) = selection.older_than {
        parts.push(format!("older than {}", humantime::format_duration(o)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// A compact age: `42s`, `7m`, `3h`, `2d`.
pub fn age(now: SystemTime, then: SystemTime) -> String {
    crate::status::render::age(now.duration_since(then).unwrap_or_default().as_secs())
}

/// `text` cut to `max` characters, an ellipsis marking the cut.
pub fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let cut: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// JSON pretty-printed; other text as is; binary as a note.
pub fn pretty(payload: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload)
        && let Ok(text) = serde_json::to_string_pretty(&value)
    {
        return text;
    }
    match std::str::from_utf8(payload) {
        Ok(text) => text.to_string(),
        Err(_) => format!("<{} bytes of binary>", payload.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_compact() {
        let now = SystemTime::now();
        assert_eq!(age(now, now - Duration::from_secs(5)), "5s");
        assert_eq!(age(now, now - Duration::from_secs(125)), "2m");
        assert_eq!(age(now, now - Duration::from_secs(7300)), "2h");
        assert_eq!(age(now, now - Duration::from_secs(3 * 86_400)), "3d");
    }

    #[test]
    fn payloads_print_pretty_when_json() {
        assert_eq!(pretty(br#"{"a":1}"#), "{\n  \"a\": 1\n}");
        assert_eq!(pretty(b"plain"), "plain");
        assert_eq!(pretty(&[0xff, 0xfe]), "<2 bytes of binary>");
    }

    #[test]
    fn long_errors_are_cut() {
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abc", 4), "abc");
    }

    #[test]
    fn reasons_are_checked() {
        assert!(check_reason("trap").is_ok());
        assert!(check_reason("oops").is_err());
    }
}
