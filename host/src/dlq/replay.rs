//! Replaying a dead letter: the CLI asks a host running the handler, over
//! a NATS request on `hookmesh.dlq.replay.<handler>` (queue group
//! `hookmesh`), to run the entry through the handler's current version.
//! The host answers once the replay is settled: the entry deleted on
//! success, or replaced by one carrying the new error on failure.
//!
//! The request body is the fixed payload when there is one (otherwise
//! empty); the rest travels in headers, so no payload is re-encoded.

use std::time::Duration;

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::DlqError;

/// The queue group replay services join.
pub const QUEUE_GROUP: &str = "hookmesh";
pub use crate::headers::{
    REPLAY_ACTOR as ACTOR_HEADER, REPLAY_PAYLOAD as PAYLOAD_HEADER, REPLAY_SEQ as SEQ_HEADER,
};

/// The subject a handler's replay service listens on.
pub fn subject(handler: &str) -> String {
    format!(
        "hookmesh.dlq.replay.{}",
        crate::subject::encode_token(handler)
    )
}

/// A replay as the host receives it.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    /// The entry.
    pub dlq_seq: u64,
    /// Who asked.
    pub actor: String,
    /// A fixed payload for this replay only.
    pub payload: Option<Bytes>,
}

impl ReplayRequest {
    /// Reads a request message.
    pub fn from_message(message: &async_nats::Message) -> Result<Self, MalformedRequest> {
        let headers = message
            .headers
            .as_ref()
            .ok_or(MalformedRequest::NoHeaders)?;
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        let dlq_seq = get(SEQ_HEADER)
            .and_then(|s| s.parse().ok())
            .ok_or(MalformedRequest::NoSequence)?;
        Ok(ReplayRequest {
            dlq_seq,
            actor: get(ACTOR_HEADER).unwrap_or_else(|| "unknown".into()),
            payload: (get(PAYLOAD_HEADER).as_deref() == Some("replaced"))
                .then(|| message.payload.clone()),
        })
    }
}

/// Why a replay request cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedRequest {
    /// The message carries no headers at all.
    #[error("no headers")]
    NoHeaders,
    /// The entry's sequence is missing or not a number.
    #[error("{SEQ_HEADER} missing or not a number")]
    NoSequence,
}

/// How a replay ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayOutcome {
    /// The entry replayed.
    pub dlq_seq: u64,
    /// Whether the handler succeeded (and the entry was deleted).
    pub ok: bool,
    /// The handler version it ran on.
    pub version: String,
    /// The new error, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// On failure: the entry that replaced the replayed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_dlq_seq: Option<u64>,
    /// Whether the entity's parked events were released to run.
    #[serde(default)]
    pub released: bool,
}

/// A host's answer: the outcome, or why it could not replay at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayAnswer {
    /// The replay ran.
    Done(ReplayOutcome),
    /// It did not run (no such entry, wrong handler, NATS trouble).
    Refused(String),
}

/// Asks a host running `handler` to replay `dlq_seq`, waiting up to
/// `timeout` for the answer.
pub async fn request(
    client: &Client,
    handler: &str,
    request: &ReplayRequest,
    timeout: Duration,
) -> Result<ReplayOutcome, DlqError> {
    let mut headers = HeaderMap::new();
    headers.insert(SEQ_HEADER, request.dlq_seq.to_string().as_str());
    headers.insert(ACTOR_HEADER, request.actor.as_str());
    let body = match &request.payload {
        Some(payload) => {
            headers.insert(PAYLOAD_HEADER, "replaced");
            payload.clone()
        }
        None => Bytes::new(),
    };
    let ask = async_nats::Request::new()
        .headers(headers)
        .payload(body)
        .timeout(Some(timeout));
    let reply = match client.send_request(subject(handler), ask).await {
        Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
            return Err(DlqError::nats(
                format!("replay of {}", request.dlq_seq),
                format!("no answer within {timeout:?} from the hosts running {handler}"),
            ));
        }
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            return Err(DlqError::nats(
                format!("replay of {}", request.dlq_seq),
                format!(
                    "no running host has handler {handler:?} loaded; start one (hookmesh serve / up) and replay again"
                ),
            ));
        }
        Err(e) => return Err(DlqError::nats(format!("replay of {}", request.dlq_seq), e)),
        Ok(reply) => reply,
    };
    match serde_json::from_slice::<ReplayAnswer>(&reply.payload) {
        Ok(ReplayAnswer::Done(outcome)) => Ok(outcome),
        Ok(ReplayAnswer::Refused(message)) => Err(DlqError::nats(
            format!("replay of {}", request.dlq_seq),
            message,
        )),
        Err(e) => Err(DlqError::nats(
            format!("replay of {}", request.dlq_seq),
            format!("unreadable answer: {e}"),
        )),
    }
}
