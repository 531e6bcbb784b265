//! Reading an event's fields out of a request, from headers and from JSON
//! pointers: no panic on any headers or body, every field read is text
//! without control characters (it is copied into message headers), and the
//! idempotency key and its KV key are derived without panicking.
//!
//! Input: `name: value` header lines, an empty line, the body. The first
//! header line, when it is `sources: <type> <entity> <id> <version> <domain>`,
//! names the sources (`header:NAME` / `json:/pointer`) instead of the
//! defaults.

#![no_main]

use hookmesh::config::{FieldSources, parse_source};
use hookmesh::extract::{extract, idempotency_key, kv_key};
use libfuzzer_sys::fuzz_target;

fn defaults() -> FieldSources {
    let source = |text: &str| parse_source(text).expect("a valid source");
    FieldSources {
        event_id: Some(source("header:x-event-id")),
        event_type: source("json:/type"),
        domain: None,
        entity_id: source("json:/data/id"),
        entity_version: Some(source("json:/data/version")),
    }
}

/// Sources from a `sources:` header, each one only when it parses.
fn sources(headers: &http::HeaderMap) -> FieldSources {
    let mut sources = defaults();
    let Some(spec) = headers.get("sources").and_then(|v| v.to_str().ok()) else {
        return sources;
    };
    let mut parsed = spec.split(' ').map(|text| parse_source(text).ok());
    if let Some(Some(s)) = parsed.next() {
        sources.event_type = s;
    }
    if let Some(Some(s)) = parsed.next() {
        sources.entity_id = s;
    }
    if let Some(s) = parsed.next() {
        sources.event_id = s;
    }
    if let Some(s) = parsed.next() {
        sources.entity_version = s;
    }
    if let Some(s) = parsed.next() {
        sources.domain = s;
    }
    sources
}

fn is_text(value: &str) -> bool {
    !value.chars().any(char::is_control)
}

fuzz_target!(|data: &[u8]| {
    let (headers, body) = hookmesh_fuzz::request(data);
    let sources = sources(&headers);
    let Ok(fields) = extract(&sources, &headers, body) else {
        return;
    };
    for value in [
        Some(&fields.event_type),
        Some(&fields.domain),
        Some(&fields.entity_id),
        fields.event_id.as_ref(),
        fields.entity_version.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        assert!(is_text(value), "{value:?}");
    }
    assert!(!fields.event_type.is_empty() && !fields.entity_id.is_empty());
    let key = idempotency_key("crm", &fields, body);
    let _ = kv_key(&key);
});
