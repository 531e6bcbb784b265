//! Byte limits of the values that become subject tokens, message ids, KV
//! keys and message headers — derived from NATS's own limits, so that no
//! value reaches the server as a protocol error.
//!
//! nats-server reads a client's protocol line (`HPUB <subject> <reply>
//! <sizes>`) into at most `max_control_line` bytes (4 KiB by default) and
//! closes the connection of a client that sends a longer one — every other
//! request and consumer on that connection with it. Headers travel in the
//! payload and count against `max_payload`. So:
//!
//! - every subject an event leads to — its own, its dead letter's
//!   (`dlq.<handler>.…`), its parking record's and its idempotency
//!   record's KV keys (looked up by subject too) — stays below
//!   [`SUBJECT_MAX`] even when each value is escaped to three (a KV key of
//!   a token: five) bytes per byte;
//! - all headers hookmesh writes fit in
//!   [`HEADER_BUDGET`](crate::config::HEADER_BUDGET), which the default body
//!   limit leaves free in a default `max_payload`.
//!
//! The unit tests below recompute both worst cases from these constants.

/// nats-server's default `max_control_line`.
pub const NATS_CONTROL_LINE: usize = 4096;

/// Room kept in a control line for the verb, the reply inbox and the two
/// sizes.
pub const CONTROL_LINE_RESERVE: usize = 256;

/// The longest subject hookmesh publishes to or looks up.
pub const SUBJECT_MAX: usize = NATS_CONTROL_LINE - CONTROL_LINE_RESERVE;

/// Longest provider (and handler, and outbox source) name.
pub const NAME_MAX: usize = 64;

/// Longest provider event id (bytes).
pub const EVENT_ID_MAX: usize = 512;
/// Longest event type.
pub const EVENT_TYPE_MAX: usize = 256;
/// Longest domain.
pub const DOMAIN_MAX: usize = 128;
/// Longest entity id.
pub const ENTITY_ID_MAX: usize = 256;
/// Longest entity version (or update time).
pub const ENTITY_VERSION_MAX: usize = 256;
/// Longest idempotency key (`Nats-Msg-Id`): a provider's name, `:` and its
/// event id fit; so do the keys an outbox row or an emit derive.
pub const IDEMPOTENCY_KEY_MAX: usize = 1024;
/// Longest `Content-Type` copied from a request into the event.
pub const CONTENT_TYPE_MAX: usize = 256;

// The idempotency key of a provider's event id (`<provider>:<event id>`)
// is within its own limit, and its record key needs no hashing.
const _: () = assert!(NAME_MAX + 1 + EVENT_ID_MAX <= IDEMPOTENCY_KEY_MAX);
const _: () = assert!(3 * (NAME_MAX + 1 + EVENT_ID_MAX) <= crate::publish::RECORD_KEY_MAX);

/// A value longer than its limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} is {length} bytes long; at most {limit} are accepted")]
pub struct TooLong {
    /// The field (`event_id`, `event_type`, `domain`, `entity_id`,
    /// `entity_version`, `idempotency_key`, `content_type`).
    pub field: &'static str,
    /// Its limit in bytes.
    pub limit: usize,
    /// Its length in bytes.
    pub length: usize,
}

/// The values of one event that NATS sees, as [`check`] takes them.
#[derive(Debug, Clone, Copy)]
pub struct Values<'a> {
    /// The provider's event id.
    pub event_id: Option<&'a str>,
    /// The event type.
    pub event_type: &'a str,
    /// The domain.
    pub domain: &'a str,
    /// The entity id.
    pub entity_id: &'a str,
    /// The entity version.
    pub entity_version: Option<&'a str>,
    /// The idempotency key.
    pub idempotency_key: &'a str,
    /// The content type.
    pub content_type: Option<&'a str>,
}

/// Checks every value against its limit; the first one over it is named.
pub fn check(values: &Values<'_>) -> Result<(), TooLong> {
    let fields = [
        ("event_id", values.event_id, EVENT_ID_MAX),
        ("event_type", Some(values.event_type), EVENT_TYPE_MAX),
        ("domain", Some(values.domain), DOMAIN_MAX),
        ("entity_id", Some(values.entity_id), ENTITY_ID_MAX),
        ("entity_version", values.entity_version, ENTITY_VERSION_MAX),
        (
            "idempotency_key",
            Some(values.idempotency_key),
            IDEMPOTENCY_KEY_MAX,
        ),
        ("content_type", values.content_type, CONTENT_TYPE_MAX),
    ];
    for (field, value, limit) in fields {
        if let Some(value) = value
            && value.len() > limit
        {
            return Err(TooLong {
                field,
                limit,
                length: value.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HEADER_BUDGET;

    /// The worst case of `encode_token`: every byte escaped as `~XX`.
    fn token(raw: usize) -> usize {
        3 * raw.max(1)
    }

    /// The worst case of `kv_key` over an encoded token: `~` itself is
    /// escaped, so one raw byte becomes `=7EXX`.
    fn kv_of_token(raw: usize) -> usize {
        5 * raw.max(1)
    }

    /// `$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.` with a 32-byte bucket.
    const KV_LOOKUP_PREFIX: usize = "$JS.API.DIRECT.GET.KV_".len() + 32 + ".$KV.".len() + 32 + 1;

    #[test]
    fn every_subject_an_event_leads_to_fits_a_control_line() {
        let partition = u32::MAX.to_string().len();
        let event = "hook.".len()
            + token(NAME_MAX)
            + 1
            + token(DOMAIN_MAX)
            + 1
            + partition
            + 1
            + token(ENTITY_ID_MAX)
            + 1
            + token(EVENT_TYPE_MAX);
        let dead_letter = "dlq.".len() + token(NAME_MAX) + 1 + event;
        let parking = KV_LOOKUP_PREFIX
            + "park.".len()
            + 3 * NAME_MAX
            + 1
            + kv_of_token(NAME_MAX)
            + 1
            + kv_of_token(DOMAIN_MAX)
            + 1
            + kv_of_token(ENTITY_ID_MAX);
        let idempotency = KV_LOOKUP_PREFIX + crate::publish::RECORD_KEY_MAX;
        for (what, length) in [
            ("event", event),
            ("dead letter", dead_letter),
            ("parking record", parking),
            ("idempotency record", idempotency),
        ] {
            assert!(
                length <= SUBJECT_MAX,
                "{what} subject may be {length} bytes, over {SUBJECT_MAX}"
            );
        }
    }

    #[test]
    fn every_header_fits_the_budget() {
        let line = |name: &str, value: usize| name.len() + 2 + value + 2;
        use crate::headers::*;
        let total = "NATS/1.0\r\n".len()
            + line(MSG_ID, IDEMPOTENCY_KEY_MAX)
            + line(PROVIDER, NAME_MAX)
            + line(EVENT_ID, IDEMPOTENCY_KEY_MAX)
            + line(EVENT_TYPE, EVENT_TYPE_MAX)
            + line(DOMAIN, DOMAIN_MAX)
            + line(ENTITY, ENTITY_ID_MAX)
            + line(ENTITY_VERSION, ENTITY_VERSION_MAX)
            + line(RECEIVED_AT, 64)
            + line(CORRELATION_ID, 128)
            + line(TRACEPARENT, 55)
            + line(CONTENT_TYPE, CONTENT_TYPE_MAX)
            + 2;
        // Dead letters add their own headers to these; half the budget is
        // left for them.
        assert!(
            2 * total <= HEADER_BUDGET,
            "event headers may be {total} bytes"
        );
    }

    #[test]
    fn the_first_value_over_its_limit_is_named() {
        let long = "x".repeat(ENTITY_ID_MAX + 1);
        let mut values = Values {
            event_id: Some("evt_1"),
            event_type: "order.created",
            domain: "order",
            entity_id: "ORD-1",
            entity_version: None,
            idempotency_key: "crm:evt_1",
            content_type: Some("application/json"),
        };
        assert_eq!(check(&values), Ok(()));
        values.entity_id = &long;
        let error = check(&values).expect_err("too long");
        assert_eq!(error.field, "entity_id");
        assert_eq!(error.limit, ENTITY_ID_MAX);
        assert_eq!(
            error.to_string(),
            "entity_id is 257 bytes long; at most 256 are accepted"
        );
        values.entity_id = "ORD-1";
        let exact = "v".repeat(ENTITY_VERSION_MAX);
        values.entity_version = Some(&exact);
        assert_eq!(check(&values), Ok(()), "the limit itself is accepted");
    }
}
