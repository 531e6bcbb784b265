//! `hookmesh send`: sign a body the way a provider would and POST it — a
//! testing aid that needs no provider account.

use std::time::SystemTime;

use http::{HeaderMap, HeaderValue, header};
use serde_json::Value;

use crate::config::{HttpConfig, Provider, Source};
use crate::verify::sign;

/// Why a webhook could not be prepared or sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The provider has no secret to sign with (config validation prevents
    /// this; kept for callers that build providers by hand).
    #[error("provider {0} has no secret to sign with")]
    NoSecret(String),
    /// `--event-type` or `--id` goes into the body, which is not a JSON object.
    #[error("cannot set {what} in the body: {why}")]
    Body {
        /// What was being set.
        what: &'static str,
        /// Why it could not be.
        why: String,
    },
    /// A value cannot be a header.
    #[error("{0} cannot be sent as a header value")]
    Header(&'static str),
    /// The HTTP request failed.
    #[error("POST {url}: {source}")]
    Http {
        /// The URL.
        url: String,
        /// The client's error.
        source: reqwest::Error,
    },
}

/// A signed request, ready to POST.
#[derive(Debug, Clone)]
pub struct Signed {
    /// Headers, signature included.
    pub headers: HeaderMap,
    /// The body exactly as signed.
    pub body: Vec<u8>,
}

/// The answer to a POST.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: String,
}

/// Signs `body` for `provider`. `event_type` and `event_id`, when given, are
/// put where the provider's config reads them (a header, or a JSON pointer
/// into the body); an event id read from a header is generated when not
/// given, as providers do for every delivery.
pub fn prepare(
    provider: &Provider,
    body: Vec<u8>,
    event_type: Option<&str>,
    event_id: Option<&str>,
    now: SystemTime,
) -> Result<Signed, SendError> {
    let mut headers = HeaderMap::new();
    let mut body = body;
    if let Some(event_type) = event_type {
        place(
            &provider.fields.event_type,
            "event type",
            event_type,
            &mut headers,
            &mut body,
        )?;
    }
    let generated;
    let id = match (event_id, &provider.fields.event_id) {
        (Some(id), _) => Some(id),
        (None, Some(Source::Header(_))) => {
            generated = format!("msg_{}", uuid::Uuid::now_v7().simple());
            Some(generated.as_str())
        }
        (None, _) => None,
    };
    if let (Some(id), Some(source)) = (id, &provider.fields.event_id) {
        place(source, "event id", id, &mut headers, &mut body)?;
    }
    let secret = (provider.verifier.secrets.first())
        .ok_or_else(|| SendError::NoSecret(provider.name.clone()))?;
    for (name, value) in sign(
        &provider.verifier.scheme,
        secret,
        id.unwrap_or(""),
        &body,
        now,
    ) {
        headers.insert(name, value);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(Signed { headers, body })
}

/// The default URL for a provider: the configured listener, with an
/// unspecified address (`0.0.0.0`) replaced by loopback.
pub fn default_url(http: &HttpConfig, provider: &str) -> String {
    let mut address = http.listen;
    if address.ip().is_unspecified() {
        address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{address}/webhooks/{provider}")
}

/// POSTs a signed request.
pub async fn post(url: &str, signed: Signed) -> Result<Answer, SendError> {
    let http = |source| SendError::Http {
        url: url.to_string(),
        source,
    };
    let response = reqwest::Client::new()
        .post(url)
        .headers(signed.headers)
        .body(signed.body)
        .send()
        .await
        .map_err(http)?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(http)?;
    Ok(Answer { status, body })
}

fn place(
    source: &Source,
    what: &'static str,
    value: &str,
    headers: &mut HeaderMap,
    body: &mut Vec<u8>,
) -> Result<(), SendError> {
    match source {
        Source::Header(name) => {
            let value = HeaderValue::from_str(value).map_err(|_| SendError::Header(what))?;
            headers.insert(name.clone(), value);
        }
        Source::Json(pointer) => {
            let why = |why: String| SendError::Body { what, why };
            let mut json: Value =
                serde_json::from_slice(body).map_err(|e| why(format!("not JSON: {e}")))?;
            set_pointer(&mut json, pointer, Value::String(value.to_string())).map_err(why)?;
            *body = serde_json::to_vec(&json).map_err(|e| SendError::Body {
                what,
                why: e.to_string(),
            })?;
        }
    }
    Ok(())
}

/// Sets the value at an RFC 6901 pointer, creating objects on the way.
fn set_pointer(json: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
    let mut node = json;
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        let Value::Object(map) = node else {
            return Err(format!(
                "{pointer}: {token:?} is inside a value that is not an object"
            ));
        };
        node = map
            .entry(token)
            .or_insert(Value::Object(Default::default()));
    }
    *node = value;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Env, Origin};

    fn provider(name: &str) -> Provider {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../hookmesh.example.toml"
        ))
        .expect("example config");
        let env = Env::from_pairs([
            ("STRIPE_SECRET", "whsec_stripe"),
            ("GITHUB_SECRET", "gh"),
            ("SHOP_SECRET", "shop"),
        ]);
        let config = Config::from_toml(&text, Origin::Builtin, &env).expect("example config loads");
        config.providers[name].clone()
    }

    #[test]
    fn signed_requests_verify_for_every_scheme() {
        let now = SystemTime::now();
        for name in ["crm", "stripe", "github", "shop"] {
            let p = provider(name);
            let body = br#"{"id":"evt_1","type":"order.created","data":{"id":"ORD-1","object":{"id":"x","object":"o"}},"repository":{"full_name":"a/b"}}"#;
            let signed = prepare(&p, body.to_vec(), Some("order.updated"), Some("evt_9"), now)
                .expect("prepares");
            p.verifier
                .verify(&signed.headers, &signed.body, now)
                .expect("verifies");
            let fields = crate::extract::extract(&p.fields, &signed.headers, &signed.body)
                .expect("extracts");
            assert_eq!(fields.event_type, "order.updated", "{name}");
            assert_eq!(fields.event_id.as_deref(), Some("evt_9"), "{name}");
        }
    }

    #[test]
    fn header_event_ids_are_generated_fresh() {
        let p = provider("crm");
        let a = prepare(&p, b"{}".to_vec(), None, None, SystemTime::now()).expect("prepares");
        let b = prepare(&p, b"{}".to_vec(), None, None, SystemTime::now()).expect("prepares");
        assert_ne!(a.headers["webhook-id"], b.headers["webhook-id"]);
    }

    #[test]
    fn pointers_create_objects() {
        let mut json = serde_json::json!({"a": 1});
        set_pointer(&mut json, "/data/x~1y", Value::from("v")).expect("sets");
        assert_eq!(json, serde_json::json!({"a": 1, "data": {"x/y": "v"}}));
        assert!(set_pointer(&mut json, "/a/b", Value::from("v")).is_err());
    }
}
