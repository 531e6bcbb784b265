//! Reading an event's fields (id, type, domain, entity, version) out of a
//! verified request, as the provider's [`FieldSources`] say, and deriving its
//! idempotency key.

use http::HeaderMap;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{FieldSources, Source};
use crate::subject::default_domain;

/// The fields of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFields {
    /// The provider's event id, when it sends one.
    pub event_id: Option<String>,
    /// The event type, e.g. `order.created`.
    pub event_type: String,
    /// The domain, e.g. `order`.
    pub domain: String,
    /// The entity id.
    pub entity_id: String,
    /// The entity's version or update time, when known.
    pub entity_version: Option<String>,
}

/// Why the fields could not be read; answered with 422 naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    /// A required field is absent or empty.
    #[error("{field} not found at {location}")]
    Missing {
        /// The field (`event_type`, `entity_id`).
        field: &'static str,
        /// Where it was looked for.
        location: String,
    },
    /// A field is present but not a string or number.
    #[error("{field} at {location} must be a string or a number")]
    NotScalar {
        /// The field.
        field: &'static str,
        /// Where it was found.
        location: String,
    },
    /// A value is not UTF-8 or holds control characters (line breaks would
    /// corrupt the message headers it is copied into).
    #[error("{field} at {location} is not UTF-8 text without control characters")]
    NotText {
        /// The field.
        field: &'static str,
        /// Where it was found.
        location: String,
    },
    /// The body is not JSON, but a field is read from it.
    #[error("body is not JSON ({reason}); {field} is read from {location}")]
    NotJson {
        /// The first field that needed the JSON body.
        field: &'static str,
        /// Its source.
        location: String,
        /// The parser's message.
        reason: String,
    },
}

impl ExtractError {
    /// The field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            ExtractError::Missing { field, .. }
            | ExtractError::NotScalar { field, .. }
            | ExtractError::NotText { field, .. }
            | ExtractError::NotJson { field, .. } => field,
        }
    }
}

/// Reads every field of an event from its headers and raw body.
pub fn extract(
    sources: &FieldSources,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<EventFields, ExtractError> {
    let mut reader = Reader {
        headers,
        body,
        json: None,
    };
    let event_type = reader.required("event_type", &sources.event_type)?;
    let domain = match &sources.domain {
        Some(source) => reader.required("domain", source)?,
        None => default_domain(&event_type).to_string(),
    };
    Ok(EventFields {
        event_id: reader.optional("event_id", sources.event_id.as_ref())?,
        entity_id: reader.required("entity_id", &sources.entity_id)?,
        entity_version: reader.optional("entity_version", sources.entity_version.as_ref())?,
        event_type,
        domain,
    })
}

/// Parses the body at most once, and only when a `json:` source needs it.
struct Reader<'a> {
    headers: &'a HeaderMap,
    body: &'a [u8],
    json: Option<Value>,
}

impl Reader<'_> {
    fn required(&mut self, field: &'static str, source: &Source) -> Result<String, ExtractError> {
        self.read(field, source)?
            .ok_or_else(|| ExtractError::Missing {
                field,
                location: source.to_string(),
            })
    }

    fn optional(
        &mut self,
        field: &'static str,
        source: Option<&Source>,
    ) -> Result<Option<String>, ExtractError> {
        match source {
            Some(source) => self.read(field, source),
            None => Ok(None),
        }
    }

    fn read(
        &mut self,
        field: &'static str,
        source: &Source,
    ) -> Result<Option<String>, ExtractError> {
        let value = match source {
            Source::Header(name) => match self.headers.get(name) {
                None => None,
                Some(v) => Some(
                    v.to_str()
                        .map_err(|_| ExtractError::NotText {
                            field,
                            location: source.to_string(),
                        })?
                        .trim()
                        .to_string(),
                ),
            },
            Source::Json(pointer) => {
                if self.json.is_none() {
                    let parsed =
                        serde_json::from_slice(self.body).map_err(|e| ExtractError::NotJson {
                            field,
                            location: source.to_string(),
                            reason: e.to_string(),
                        })?;
                    self.json = Some(parsed);
                }
                match self.json.as_ref().and_then(|json| json.pointer(pointer)) {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Number(n)) => Some(n.to_string()),
                    Some(_) => {
                        return Err(ExtractError::NotScalar {
                            field,
                            location: source.to_string(),
                        });
                    }
                }
            }
        };
        if value
            .as_deref()
            .is_some_and(|v| v.chars().any(char::is_control))
        {
            return Err(ExtractError::NotText {
                field,
                location: source.to_string(),
            });
        }
        Ok(value.filter(|v| !v.is_empty()))
    }
}

/// The idempotency key of an event:
/// - `"{provider}:{event_id}"` when the provider gives an event id;
/// - else the hex `sha256("{provider}:{event_type}:{entity_id}:{version}")`
///   when the entity version (or update time) is known;
/// - else the hex sha256 of `"{provider}:"` followed by the raw body.
pub fn idempotency_key(provider: &str, fields: &EventFields, body: &[u8]) -> String {
    if let Some(id) = &fields.event_id {
        return format!("{provider}:{id}");
    }
    let mut hash = Sha256::new();
    match &fields.entity_version {
        Some(version) => hash.update(format!(
            "{provider}:{}:{}:{version}",
            fields.event_type, fields.entity_id
        )),
        None => {
            hash.update(provider.as_bytes());
            hash.update(b":");
            hash.update(body);
        }
    }
    hex::encode(hash.finalize())
}

/// The `hook_idempotency` KV key for an idempotency key. KV keys allow only
/// `[-/_=.A-Za-z0-9]`, so every byte outside `[-_A-Za-z0-9]` is written
/// `=XX` (hex): `crm:msg_1` → `crm=3Amsg_1`. Reversible and readable, so ops
/// can `nats kv get hook_idempotency crm=3Amsg_1`.
pub fn kv_key(idempotency_key: &str) -> String {
    let mut out = String::with_capacity(idempotency_key.len() + 8);
    for &b in idempotency_key.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push('=');
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_source;

    fn sources(
        event_id: Option<&str>,
        event_type: &str,
        domain: Option<&str>,
        entity: &str,
        version: Option<&str>,
    ) -> FieldSources {
        let p = |s: &str| parse_source(s).expect("valid source");
        FieldSources {
            event_id: event_id.map(p),
            event_type: p(event_type),
            domain: domain.map(p),
            entity_id: p(entity),
            entity_version: version.map(p),
        }
    }

    fn crm() -> FieldSources {
        sources(
            Some("header:webhook-id"),
            "json:/type",
            None,
            "json:/data/id",
            Some("json:/data/version"),
        )
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn reads_headers_and_json() {
        let body = br#"{"type":"order.created","data":{"id":"ORD-1","version":3}}"#;
        let fields = extract(&crm(), &headers(&[("webhook-id", "msg_1")]), body).expect("extracts");
        assert_eq!(
            fields,
            EventFields {
                event_id: Some("msg_1".into()),
                event_type: "order.created".into(),
                domain: "order".into(),
                entity_id: "ORD-1".into(),
                entity_version: Some("3".into()),
            }
        );
    }

    #[test]
    fn explicit_domain_and_shopify_topics() {
        let stripe = sources(
            Some("json:/id"),
            "json:/type",
            Some("json:/data/object/object"),
            "json:/data/object/id",
            None,
        );
        let body = br#"{"id":"evt_1","type":"charge.succeeded","data":{"object":{"object":"charge","id":"ch_1"}}}"#;
        let fields = extract(&stripe, &HeaderMap::new(), body).expect("extracts");
        assert_eq!(
            (fields.domain.as_str(), fields.entity_id.as_str()),
            ("charge", "ch_1")
        );

        let shop = sources(None, "header:x-shopify-topic", None, "json:/id", None);
        let fields = extract(
            &shop,
            &headers(&[("x-shopify-topic", "orders/create")]),
            br#"{"id":820982911946154508}"#,
        )
        .expect("extracts");
        assert_eq!(fields.domain, "orders");
        assert_eq!(fields.entity_id, "820982911946154508");
    }

    #[test]
    fn missing_fields_are_named() {
        let err = extract(
            &crm(),
            &HeaderMap::new(),
            br#"{"type":"order.created","data":{}}"#,
        )
        .unwrap_err();
        assert_eq!(err.field(), "entity_id");
        assert_eq!(err.to_string(), "entity_id not found at json:/data/id");
        let err = extract(
            &crm(),
            &HeaderMap::new(),
            br#"{"type":"","data":{"id":"x"}}"#,
        )
        .unwrap_err();
        assert_eq!(err.field(), "event_type");
        let err = extract(
            &crm(),
            &HeaderMap::new(),
            br#"{"type":{"a":1},"data":{"id":"x"}}"#,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            ExtractError::NotScalar {
                field: "event_type",
                ..
            }
        ));
        let err = extract(&crm(), &HeaderMap::new(), b"not json").unwrap_err();
        assert!(matches!(
            err,
            ExtractError::NotJson {
                field: "event_type",
                ..
            }
        ));
        let err = extract(
            &crm(),
            &HeaderMap::new(),
            br#"{"type":"a","data":{"id":"x\r\nNats-Msg-Id: y"}}"#,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            ExtractError::NotText {
                field: "entity_id",
                ..
            }
        ));
    }

    #[test]
    fn idempotency_key_prefers_event_id_then_version_then_body() {
        let mut fields = EventFields {
            event_id: Some("msg_1".into()),
            event_type: "order.created".into(),
            domain: "order".into(),
            entity_id: "ORD-1".into(),
            entity_version: Some("3".into()),
        };
        assert_eq!(idempotency_key("crm", &fields, b"{}"), "crm:msg_1");
        fields.event_id = None;
        let by_version = idempotency_key("crm", &fields, b"{}");
        assert_eq!(
            by_version,
            hex::encode(Sha256::digest(b"crm:order.created:ORD-1:3"))
        );
        assert_eq!(idempotency_key("crm", &fields, b"other body"), by_version);
        fields.entity_version = None;
        assert_eq!(
            idempotency_key("crm", &fields, b"{}"),
            hex::encode(Sha256::digest(b"crm:{}"))
        );
    }

    #[test]
    fn kv_keys_are_valid_and_readable() {
        assert_eq!(kv_key("crm:msg_1"), "crm=3Amsg_1");
        assert_eq!(kv_key("gh:a.b/c d"), "gh=3Aa=2Eb=2Fc=20d");
        let key = kv_key("x:é*>~=");
        assert!(
            key.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
            "{key}"
        );
    }
}
