//! A [`Snapshot`] as one terminal screen: aligned columns, what needs a
//! person first, colour only when asked for (a terminal).

use std::fmt::Write as _;

use super::{AuditEntry, HandlerState, Snapshot};
use crate::audit::Action;
use crate::dlq::commands::shorten;

/// How a cell reads at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Nothing to say.
    Plain,
    /// As it should be.
    Good,
    /// Worth a look.
    Warn,
    /// Needs a person.
    Bad,
    /// Background detail.
    Dim,
}

impl Tone {
    fn ansi(self) -> Option<&'static str> {
        match self {
            Tone::Plain => None,
            Tone::Good => Some("32"),
            Tone::Warn => Some("33"),
            Tone::Bad => Some("1;31"),
            Tone::Dim => Some("2"),
        }
    }
}

/// One table cell: its text and tone.
#[derive(Debug, Clone)]
struct Cell {
    text: String,
    tone: Tone,
}

fn cell(text: impl Into<String>) -> Cell {
    Cell {
        text: text.into(),
        tone: Tone::Plain,
    }
}

fn toned(text: impl Into<String>, tone: Tone) -> Cell {
    Cell {
        text: text.into(),
        tone,
    }
}

/// Columns aligned on the plain text, so colour never shifts them.
struct Table {
    headers: Vec<&'static str>,
    /// Right-aligned columns (numbers).
    right: Vec<bool>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    fn new(columns: &[(&'static str, bool)]) -> Table {
        Table {
            headers: columns.iter().map(|(h, _)| *h).collect(),
            right: columns.iter().map(|(_, r)| *r).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<Cell>) {
        self.rows.push(cells);
    }

    fn write(&self, out: &mut String, colour: bool) {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.text.chars().count());
            }
        }
        let header: Vec<Cell> = self.headers.iter().map(|h| toned(*h, Tone::Dim)).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in row.iter().enumerate() {
                let width = widths[i];
                let pad = width.saturating_sub(c.text.chars().count());
                if i > 0 {
                    line.push_str("  ");
                }
                let last = i + 1 == row.len();
                if self.right[i] {
                    line.push_str(&" ".repeat(pad));
                }
                line.push_str(&paint(&c.text, c.tone, colour));
                if !self.right[i] && !last {
                    line.push_str(&" ".repeat(pad));
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
}

/// `text` in `tone`'s colour when `colour` is on.
pub fn paint(text: &str, tone: Tone, colour: bool) -> String {
    match tone.ansi() {
        Some(code) if colour && !text.is_empty() => format!("\x1b[{code}m{text}\x1b[0m"),
        _ => text.to_string(),
    }
}

/// The snapshot as text; `colour` adds ANSI colours (for a terminal).
pub fn text(snapshot: &Snapshot, colour: bool) -> String {
    let mut out = String::new();
    let title = paint("hookmesh status", Tone::Plain, colour);
    let _ = writeln!(out, "{title}  {}", snapshot.taken_at);
    if !snapshot.problems.is_empty() {
        out.push('\n');
        for problem in &snapshot.problems {
            let _ = writeln!(out, "{} {problem}", paint("PROBLEM", Tone::Bad, colour));
        }
    }

    out.push('\n');
    nats(&mut out, snapshot, colour);

    out.push('\n');
    let mut streams = Table::new(&[
        ("STREAM", false),
        ("MESSAGES", true),
        ("BYTES", true),
        ("CONSUMERS", true),
        ("REPLICAS", true),
        ("LEADER", false),
    ]);
    for s in &snapshot.streams {
        if !s.present {
            streams.row(vec![
                cell(&s.name),
                toned("missing", Tone::Bad),
                cell(""),
                cell(""),
                cell(""),
                cell(""),
            ]);
            continue;
        }
        streams.row(vec![
            cell(&s.name),
            cell(s.messages.to_string()),
            cell(bytes(s.bytes)),
            cell(s.consumers.to_string()),
            cell(s.replicas.to_string()),
            cell(s.leader.as_deref().unwrap_or("-")),
        ]);
    }
    streams.write(&mut out, colour);

    out.push('\n');
    handlers(&mut out, &snapshot.handlers, colour);

    out.push('\n');
    let dlq = &snapshot.dlq;
    if dlq.depth == 0 {
        let _ = writeln!(out, "DEAD LETTERS  {}", paint("none", Tone::Good, colour));
    } else {
        let oldest = dlq.oldest_secs.map(age).unwrap_or_default();
        let _ = writeln!(
            out,
            "DEAD LETTERS  {}, oldest {oldest} old — see `hookmesh dlq list`",
            paint(&dlq.depth.to_string(), Tone::Bad, colour)
        );
    }

    out.push('\n');
    audit(&mut out, &snapshot.audit, colour);
    out
}

fn nats(out: &mut String, snapshot: &Snapshot, colour: bool) {
    let n = &snapshot.nats;
    let mut line = format!(
        "NATS       {} {} at {}",
        server_name(&n.server_name, &n.server_id),
        n.version,
        n.address
    );
    if let Some(cluster) = &n.cluster {
        let _ = write!(line, ", cluster {cluster}");
    }
    if !n.connect_urls.is_empty() {
        let _ = write!(line, " (also {})", n.connect_urls.join(", "));
    }
    let _ = writeln!(out, "{line}");
    match &snapshot.jetstream {
        Some(js) => {
            let limit = |l: Option<u64>| l.map_or_else(|| "no limit".to_string(), bytes);
            let _ = writeln!(
                out,
                "JETSTREAM  {} streams, {} consumers; file {} ({}), memory {} ({}); API {} calls, {} errors",
                js.streams,
                js.consumers,
                bytes(js.storage),
                limit(js.max_storage),
                bytes(js.memory),
                limit(js.max_memory),
                js.api_total,
                js.api_errors,
            );
        }
        None if n.jetstream => {
            let _ = writeln!(out, "JETSTREAM  {}", paint("unreadable", Tone::Bad, colour));
        }
        None => {
            let _ = writeln!(
                out,
                "JETSTREAM  {}",
                paint("not enabled on this server", Tone::Bad, colour)
            );
        }
    }
}

fn handlers(out: &mut String, handlers: &[HandlerState], colour: bool) {
    if handlers.is_empty() {
        let _ = writeln!(out, "HANDLERS  none deployed or running");
        return;
    }
    let mut table = Table::new(&[
        ("HANDLER", false),
        ("VERSION", false),
        ("OWNED", true),
        ("OWNERS", false),
        ("PENDING", true),
        ("ACK PENDING", true),
        ("REDELIVERED", true),
        ("DEAD LETTERS", true),
        ("OLDEST", true),
    ]);
    for h in handlers {
        let version = match &h.deployment {
            Some(d) => cell(&d.version),
            None => toned("not deployed", Tone::Dim),
        };
        let unowned = h.unowned();
        let total = h.partitions.len();
        let owned = if total == 0 {
            toned("-", Tone::Dim)
        } else if unowned.is_empty() {
            toned(format!("{total}/{total}"), Tone::Good)
        } else {
            toned(format!("{}/{total}", total - unowned.len()), Tone::Bad)
        };
        let mut owners: Vec<String> = h
            .owners()
            .iter()
            .map(|(host, n)| format!("{} ×{n}", short_host(host)))
            .collect();
        if !unowned.is_empty() {
            owners.push(format!("none for {}", list(&unowned)));
        }
        let owners = match (owners.is_empty(), unowned.is_empty()) {
            (true, _) => toned("no host runs it", Tone::Dim),
            (false, true) => cell(owners.join(", ")),
            (false, false) => toned(owners.join(", "), Tone::Bad),
        };
        let count = |n: u64, tone: Tone| {
            if n == 0 {
                cell("0")
            } else {
                toned(n.to_string(), tone)
            }
        };
        table.row(vec![
            cell(&h.name),
            version,
            owned,
            owners,
            count(h.pending, Tone::Warn),
            count(h.ack_pending, Tone::Plain),
            count(h.redelivered, Tone::Warn),
            count(h.dead_letters, Tone::Bad),
            match h.oldest_dead_letter_secs {
                Some(secs) => toned(age(secs), Tone::Bad),
                None => cell("-"),
            },
        ]);
    }
    table.write(out, colour);
}

fn audit(out: &mut String, entries: &[AuditEntry], colour: bool) {
    if entries.is_empty() {
        let _ = writeln!(out, "AUDIT  nothing recorded yet");
        return;
    }
    let _ = writeln!(out, "AUDIT (latest {}, newest first)", entries.len());
    let mut table = Table::new(&[
        ("SEQ", true),
        ("AT", false),
        ("ACTION", false),
        ("HANDLER", false),
        ("ACTOR", false),
        ("OUTCOME", false),
        ("DETAIL", false),
    ]);
    for entry in entries {
        let r = &entry.record;
        let outcome = match r.outcome.as_str() {
            "ok" => toned(&r.outcome, Tone::Good),
            "failed" => toned(&r.outcome, Tone::Bad),
            _ => cell(&r.outcome),
        };
        table.row(vec![
            cell(entry.seq.to_string()),
            cell(&r.at),
            cell(r.action.token()),
            cell(&r.handler),
            cell(shorten(&r.actor, 32)),
            outcome,
            cell(shorten(&audit_detail(entry), 60)),
        ]);
    }
    table.write(out, colour);
}

/// What an audit record concerned, in a few words.
pub fn audit_detail(entry: &AuditEntry) -> String {
    let r = &entry.record;
    let mut parts = Vec::new();
    match (r.action, &r.version, &r.previous_version) {
        (Action::Replay | Action::Purge, _, _) => {}
        (_, Some(version), Some(previous)) => parts.push(format!("{version} (was {previous})")),
        (_, Some(version), None) => parts.push(version.clone()),
        _ => {}
    }
    if !r.entries.is_empty() {
        let seqs: Vec<String> = r.entries.iter().map(|e| e.dlq_seq.to_string()).collect();
        parts.push(format!("dead letter {}", seqs.join(", ")));
    }
    if r.payload_changed == Some(true) {
        parts.push("fixed payload".into());
    }
    if let Some(error) = &r.error {
        parts.push(error.clone());
    }
    parts.join("; ")
}

/// A server's name, or a short form of its id when it was given no name
/// (nats-server then names itself by its 56-character id).
pub fn server_name(name: &str, id: &str) -> String {
    if name == id && id.len() > 12 {
        format!("server {}…", &id[..12])
    } else {
        name.to_string()
    }
}

/// A host id (`<hostname>:<pid>:<uuid>`) short enough for a column: the
/// uuid cut to its last 6 characters (its random part).
pub fn short_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((name, id)) if id.len() > 6 => format!("{name}:{}", &id[id.len() - 6..]),
        _ => host.to_string(),
    }
}

/// A compact age: `42s`, `7m`, `3h`, `2d`.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Bytes for people: `512 B`, `3.4 KiB`, `1.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Partitions as a short list: `0-3, 7, 9-10`.
pub fn list(partitions: &[u32]) -> String {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &p in partitions {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == p => *end = p,
            _ => runs.push((p, p)),
        }
    }
    runs.iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{DeploymentState, DlqState, NatsState, PartitionOwner, StreamState};

    fn snapshot() -> Snapshot {
        let owner = |partition, host: &str, lease_ms| PartitionOwner {
            partition,
            host: Some(host.to_string()),
            lease_ms: Some(lease_ms),
        };
        Snapshot {
            taken_at: "2025-01-01T03:00:00Z".into(),
            taken_at_ms: 0,
            nats: NatsState {
                server_name: "n1".into(),
                version: "2.9.10".into(),
                address: "127.0.0.1:4222".into(),
                jetstream: true,
                ..NatsState::default()
            },
            jetstream: None,
            streams: vec![
                StreamState {
                    name: "HOOK_EVENTS".into(),
                    present: true,
                    messages: 12,
                    bytes: 3500,
                    consumers: 32,
                    replicas: 1,
                    ..StreamState::default()
                },
                StreamState {
                    name: "HOOK_DLQ".into(),
                    ..StreamState::default()
                },
            ],
            handlers: vec![HandlerState {
                name: "order-sync".into(),
                deployment: Some(DeploymentState {
                    version: "3-abcdef012345".into(),
                    ..DeploymentState::default()
                }),
                consumers: 4,
                pending: 5,
                partitions: vec![
                    owner(0, "web-1:42:0190aaaabbbbcccc", 3000),
                    owner(1, "web-1:42:0190aaaabbbbcccc", 3000),
                    owner(2, "web-2:7:0190ddddeeeeffff", -10),
                    PartitionOwner {
                        partition: 3,
                        host: None,
                        lease_ms: None,
                    },
                ],
                dead_letters: 2,
                oldest_dead_letter_secs: Some(7200),
                ..HandlerState::default()
            }],
            dlq: DlqState {
                depth: 2,
                oldest_secs: Some(7200),
            },
            audit: Vec::new(),
            problems: vec!["stream HOOK_DLQ is missing (run `hookmesh streams apply`)".into()],
        }
    }

    #[test]
    fn the_screen_aligns_columns_and_names_what_needs_a_person() {
        let text = text(&snapshot(), false);
        assert!(!text.contains('\x1b'), "no colour unless asked:\n{text}");
        assert!(
            text.contains("PROBLEM stream HOOK_DLQ is missing"),
            "{text}"
        );
        let lines: Vec<&str> = text.lines().collect();
        let header = lines
            .iter()
            .find(|l| l.starts_with("HANDLER "))
            .expect("handler header");
        let row = lines
            .iter()
            .find(|l| l.starts_with("order-sync "))
            .expect("handler row");
        // Right-aligned numbers end under their header.
        let pending_end = header[..header.find("PENDING").expect("PENDING")]
            .chars()
            .count()
            + "PENDING".len();
        let row_start: String = row.chars().take(pending_end).collect();
        assert!(row_start.ends_with(" 5"), "{header}\n{row}");
        assert!(row.contains("2/4"), "{row}");
        assert!(row.contains("web-1:42:bbcccc ×2, none for 2-3"), "{row}");
        assert!(row.contains("2h"), "{row}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("HOOK_DLQ ") && l.ends_with(" missing")),
            "{text}"
        );
        assert!(text.contains("DEAD LETTERS  2, oldest 2h old"), "{text}");
    }

    #[test]
    fn colour_is_added_only_when_asked_and_does_not_shift_columns() {
        let plain = text(&snapshot(), false);
        let coloured = text(&snapshot(), true);
        assert!(coloured.contains("\x1b[1;31m"), "{coloured}");
        let strip = |s: &str| {
            let mut out = String::new();
            let mut chars = s.chars();
            while let Some(c) = chars.next() {
                if c == '\x1b' {
                    for c in chars.by_ref() {
                        if c == 'm' {
                            break;
                        }
                    }
                } else {
                    out.push(c);
                }
            }
            out
        };
        assert_eq!(strip(&coloured), plain);
    }

    #[test]
    fn small_formats_read_well() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(7300), "2h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3500), "3.4 KiB");
        assert_eq!(list(&[0, 1, 2, 3, 7, 9, 10]), "0-3, 7, 9-10");
        assert_eq!(short_host("web-1:42:0190aaaabbbbcccc"), "web-1:42:bbcccc");
    }
}
