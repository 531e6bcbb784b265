//! The console's pages, rendered on the server with `maud`: every value
//! spliced in is HTML-escaped by the template engine — payloads, headers,
//! errors and names are untrusted input — and nothing is inlined that the
//! Content-Security-Policy would have to allow (styles and the one script
//! are files under `/console/assets/`).

use std::time::SystemTime;

use maud::{DOCTYPE, Markup, html};

use crate::dlq::commands::{age, pretty, shorten};
use crate::dlq::{DeadLetter, DlqReason};
use crate::status::render::{audit_detail, bytes, list, server_name, short_host};
use crate::status::{HandlerState, Snapshot};

/// How often the pages that show live state reload themselves.
pub const REFRESH_SECS: u32 = 5;

/// What the DLQ list is filtered by, as the form holds it.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct Filters {
    /// Only this handler's.
    pub handler: String,
    /// Only this reason.
    pub reason: String,
    /// Only entries stored within this long (`30m`, `2h`, `7d`).
    pub newer: String,
    /// Only entries stored longer ago than this.
    pub older: String,
}

fn layout(title: &str, refresh: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · hookmesh" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body data-refresh=[refresh.then_some(REFRESH_SECS)] {
                header {
                    a.brand href="/console" { "hookmesh" }
                    nav {
                        a href="/console" { "Overview" }
                        a href="/console/dlq" { "Dead letters" }
                    }
                    @if refresh {
                        span.refresh { "refreshes every " (REFRESH_SECS) " s" }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The overview: what `hookmesh status` prints.
pub fn overview(snapshot: &Snapshot) -> Markup {
    let body = html! {
        h1 { "Overview " small { "at " (snapshot.taken_at) } }
        @if !snapshot.problems.is_empty() {
            section.problems {
                h2 { "Problems" }
                ul { @for problem in &snapshot.problems { li { (problem) } } }
            }
        }
        section {
            h2 { "NATS" }
            (nats(snapshot))
        }
        section {
            h2 { "Handlers" }
            (handlers(&snapshot.handlers))
        }
        section {
            h2 { "Dead letters" }
            @if snapshot.dlq.depth == 0 {
                p.good { "None." }
            } @else {
                p.bad {
                    a href="/console/dlq" { (snapshot.dlq.depth) " dead letter(s)" }
                    @if let Some(secs) = snapshot.dlq.oldest_secs {
                        ", the oldest " (crate::status::render::age(secs)) " old."
                    }
                }
            }
        }
        section {
            h2 { "Streams" }
            table {
                thead { tr { th { "Stream" } th.n { "Messages" } th.n { "Bytes" } th.n { "Consumers" } th.n { "Replicas" } th { "Leader" } } }
                tbody {
                    @for s in &snapshot.streams {
                        tr {
                            td { (s.name) }
                            @if s.present {
                                td.n { (s.messages) } td.n { (bytes(s.bytes)) } td.n { (s.consumers) }
                                td.n { (s.replicas) } td { (s.leader.as_deref().unwrap_or("-")) }
                            } @else {
                                td.bad colspan="5" { "missing — run hookmesh streams apply" }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Audit trail " small { "latest first" } }
            @if snapshot.audit.is_empty() {
                p { "Nothing recorded yet." }
            } @else {
                table.audit {
                    thead { tr { th.n { "Seq" } th { "At" } th { "Action" } th { "Handler" } th { "Actor" } th { "Outcome" } th { "Detail" } } }
                    tbody {
                        @for entry in &snapshot.audit {
                            tr {
                                td.n { (entry.seq) } td { (entry.record.at) } td { (entry.record.action.token()) }
                                td { (entry.record.handler) } td { (entry.record.actor) }
                                td class=(outcome_class(&entry.record.outcome)) { (entry.record.outcome) }
                                td { (shorten(&audit_detail(entry), 120)) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout("Overview", true, body)
}

fn outcome_class(outcome: &str) -> &'static str {
    match outcome {
        "ok" => "good",
        "failed" => "bad",
        _ => "",
    }
}

fn nats(snapshot: &Snapshot) -> Markup {
    let n = &snapshot.nats;
    html! {
        dl {
            dt { "Server" }
            dd { (server_name(&n.server_name, &n.server_id)) " " (n.version) " at " (n.address)
                @if let Some(cluster) = &n.cluster { ", cluster " (cluster) }
                @if !n.connect_urls.is_empty() { " (also " (n.connect_urls.join(", ")) ")" } }
            dt { "JetStream" }
            dd {
                @match &snapshot.jetstream {
                    Some(js) => {
                        (js.streams) " streams, " (js.consumers) " consumers; file "
                        (bytes(js.storage)) ", memory " (bytes(js.memory)) "; API "
                        (js.api_total) " calls, " (js.api_errors) " errors"
                    }
                    None => span.bad { "unreadable" }
                }
            }
        }
    }
}

fn handlers(handlers: &[HandlerState]) -> Markup {
    html! {
        @if handlers.is_empty() {
            p { "No handler is deployed or running." }
        } @else {
            table.handlers {
                thead { tr {
                    th { "Handler" } th { "Version" } th.n { "Owned" } th { "Owners" } th.n { "Pending" }
                    th.n { "Ack pending" } th.n { "Redelivered" } th.n { "Dead letters" } th.n { "Oldest" }
                } }
                tbody {
                    @for h in handlers {
                        @let unowned = h.unowned();
                        @let total = h.partitions.len();
                        tr {
                            td { (h.name) }
                            td {
                                @match &h.deployment {
                                    Some(d) => span title=(format!("sha256 {} by {} at {}", d.digest, d.deployed_by, d.deployed_at)) { (d.version) },
                                    None => span.dim { "not deployed" },
                                }
                            }
                            @if total == 0 {
                                td.n.dim { "-" }
                            } @else if unowned.is_empty() {
                                td.n.good { (total) "/" (total) }
                            } @else {
                                td.n.bad { (total - unowned.len()) "/" (total) }
                            }
                            td {
                                @for (host, count) in h.owners() {
                                    span.owner title=(host) { (short_host(&host)) " ×" (count) } " "
                                }
                                @if !unowned.is_empty() {
                                    span.bad { "none for " (list(&unowned)) }
                                }
                            }
                            td.n.warn[h.pending > 0] { (h.pending) }
                            td.n { (h.ack_pending) }
                            td.n.warn[h.redelivered > 0] { (h.redelivered) }
                            td.n.bad[h.dead_letters > 0] {
                                @if h.dead_letters > 0 {
                                    a href=(format!("/console/dlq?handler={}", urlencode(&h.name))) { (h.dead_letters) }
                                } @else { "0" }
                            }
                            td.n { (h.oldest_dead_letter_secs.map_or_else(|| "-".to_string(), crate::status::render::age)) }
                        }
                    }
                }
            }
            @for h in handlers.iter().filter(|h| !h.partitions.is_empty()) {
                details {
                    summary { "Partitions of " (h.name) }
                    table.partitions {
                        thead { tr { th.n { "Partition" } th { "Host" } th { "Lease" } } }
                        tbody {
                            @for p in &h.partitions {
                                tr {
                                    td.n { (p.partition) }
                                    td { (p.host.as_deref().unwrap_or("-")) }
                                    @match p.lease_ms {
                                        Some(ms) if ms > 0 => td.good { "holds " (format!("{:.1}", ms as f64 / 1000.0)) " s more" },
                                        Some(ms) => td.bad { "ran out " (format!("{:.1}", -ms as f64 / 1000.0)) " s ago" },
                                        None => td.bad { "no owner" },
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The DLQ list with its filter form.
pub fn dlq_list(
    entries: &[DeadLetter],
    filters: &Filters,
    handlers: &[String],
    error: Option<&str>,
) -> Markup {
    let now = SystemTime::now();
    let body = html! {
        h1 { "Dead letters" }
        form.filters method="get" action="/console/dlq" {
            label { "Handler "
                select name="handler" {
                    option value="" { "any" }
                    @for h in handlers {
                        option value=(h) selected[*h == filters.handler] { (h) }
                    }
                }
            }
            label { "Reason "
                select name="reason" {
                    option value="" { "any" }
                    @for r in DlqReason::ALL {
                        option value=(r.as_str()) selected[r.as_str() == filters.reason] { (r.as_str()) }
                    }
                }
            }
            label { "Newer than " input name="newer" value=(filters.newer) placeholder="e.g. 2h" size="6"; }
            label { "Older than " input name="older" value=(filters.older) placeholder="e.g. 1d" size="6"; }
            button type="submit" { "Filter" }
        }
        @if let Some(error) = error {
            p.outcome.bad { (error) }
        }
        @if entries.is_empty() {
            p.good { "No dead letters" @if filters.handler.is_empty() && filters.reason.is_empty() && filters.newer.is_empty() && filters.older.is_empty() { "." } @else { " match." } }
        } @else {
            p { (entries.len()) " dead letter(s), oldest first." }
            table.dlq {
                thead { tr { th.n { "Seq" } th.n { "Age" } th { "Handler" } th { "Reason" } th.n { "Attempts" } th { "Subject" } th { "Error" } } }
                tbody {
                    @for e in entries {
                        tr {
                            td.n { a href=(format!("/console/dlq/{}", e.dlq_seq)) { (e.dlq_seq) } }
                            td.n { (age(now, e.stored_at)) }
                            td { (e.handler) }
                            td { (e.reason) }
                            td.n { (e.attempts) }
                            td.subject { (e.subject) }
                            td.error { (shorten(&e.error, 120)) }
                        }
                    }
                }
            }
        }
    };
    layout("Dead letters", true, body)
}

/// One dead letter: failure record, headers, payload, and the replay and
/// purge forms.
pub fn dlq_entry(entry: &DeadLetter, token_configured: bool) -> Markup {
    let now = SystemTime::now();
    let text = std::str::from_utf8(&entry.payload).ok();
    let body = html! {
        h1 { "Dead letter " (entry.dlq_seq) " " small { (age(now, entry.stored_at)) " old" } }
        section {
            h2 { "Failure" }
            dl.record {
                dt { "Handler" } dd { (entry.handler) " (version " (entry.handler_version) ")" }
                dt { "Reason" } dd { (entry.reason) }
                dt { "Attempts" } dd { (entry.attempts) }
                dt { "First failure" } dd { (entry.first_failure) }
                dt { "Last failure" } dd { (entry.last_failure) }
                dt { "Event" } dd { (entry.subject) " (HOOK_EVENTS seq " (entry.stream_seq) ")" }
                dt { "Error" } dd.error { (entry.error) }
            }
        }
        section {
            h2 { "Headers" }
            table.headers {
                tbody {
                    @for (name, values) in entry.headers.iter() {
                        @for value in values {
                            tr { th { (name.as_ref() as &str) } td { (value.as_str()) } }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Payload " small { (entry.payload.len()) " bytes" } }
            pre.payload { (pretty(&entry.payload)) }
        }
        @if !token_configured {
            p.outcome.bad { "This host has no [admin] token configured: replay and purge are off here (use hookmesh dlq replay / purge)." }
        }
        section.actions {
            form.replay method="post" action=(format!("/console/dlq/{}/replay", entry.dlq_seq)) {
                h2 { "Replay" }
                p { "Runs the event again on the handler's current version; success removes the entry." }
                @if let Some(text) = text {
                    label.check { input type="checkbox" name="edited" value="on"; " Replay with this payload instead (this replay only; a failure keeps the original):" }
                    textarea name="payload" rows="10" spellcheck="false" { (pretty(text.as_bytes())) }
                }
                (credentials())
                button type="submit" { "Replay" }
            }
            form.purge method="post" action=(format!("/console/dlq/{}/purge", entry.dlq_seq)) {
                h2 { "Purge" }
                p { "Deletes the entry for good and releases an entity it parked." }
                label.check { input type="checkbox" name="confirm" value="yes" required; " Yes, delete dead letter " (entry.dlq_seq) }
                (credentials())
                button.danger type="submit" { "Purge" }
            }
        }
    };
    layout(&format!("Dead letter {}", entry.dlq_seq), false, body)
}

fn credentials() -> Markup {
    html! {
        label { "Your name (for the audit trail) " input name="name" autocomplete="name" size="16"; }
        label { "Admin token " input type="password" name="token" autocomplete="off" required size="24"; }
    }
}

/// What a replay or purge came to.
pub fn outcome(title: &str, ok: bool, message: &str, seq: u64) -> Markup {
    let body = html! {
        h1 { (title) }
        p.outcome.good[ok].bad[!ok] { (message) }
        p {
            a href="/console/dlq" { "Back to the dead letters" }
            " · "
            a href=(format!("/console/dlq/{seq}")) { "Dead letter " (seq) }
        }
    };
    layout(title, false, body)
}

/// A page that says what went wrong.
pub fn problem(title: &str, message: &str) -> Markup {
    let body = html! {
        h1 { (title) }
        p.outcome.bad { (message) }
        p { a href="/console" { "Overview" } }
    };
    layout(title, false, body)
}

/// A query-string value: every byte but `A-Za-z0-9-_.~` percent-encoded.
fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::HeaderMap;
    use bytes::Bytes;

    fn hostile() -> DeadLetter {
        let mut headers = HeaderMap::new();
        headers.insert("Hook-Correlation-Id", "<img src=x onerror=alert(1)>");
        DeadLetter {
            dlq_seq: 7,
            stored_at: SystemTime::now(),
            dlq_subject: "dlq.h.crm.order.1.X.order.created".into(),
            handler: "h\"><script>alert(1)</script>".into(),
            handler_version: "1-abc".into(),
            reason: "permanent".into(),
            error: "</pre><script>alert(2)</script>".into(),
            attempts: 1,
            stream_seq: 3,
            subject: "hook.crm.order.1.X.order.created".into(),
            first_failure: String::new(),
            last_failure: String::new(),
            headers,
            payload: Bytes::from_static(b"{\"note\":\"<script>alert(3)</script>\"}"),
        }
    }

    #[test]
    fn everything_untrusted_is_escaped() {
        let page = dlq_entry(&hostile(), true).into_string();
        // The only script element is the console's own file.
        assert_eq!(page.matches("<script").count(), 1, "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(3)&lt;/script&gt;"),
            "{page}"
        );
        assert!(
            page.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{page}"
        );
        assert!(!page.contains("<img"), "{page}");
        let list =
            dlq_list(&[hostile()], &Filters::default(), &[], Some("<b>bad</b>")).into_string();
        assert_eq!(list.matches("<script").count(), 1, "{list}");
        assert!(!list.contains("<b>bad"), "{list}");
    }

    #[test]
    fn handler_names_in_links_are_encoded() {
        assert_eq!(urlencode("order-sync"), "order-sync");
        assert_eq!(urlencode("a b&c"), "a%20b%26c");
    }
}
