//! Event subjects, their reversible token encoding, and the partition function.
//!
//! An event lives on
//! `hook.<provider>.<domain>.<partition>.<entity>.<event type…>`, e.g.
//! `hook.crm.order.7.ORD-1.order.created`. Provider, domain and entity are
//! one token each; the event type keeps its dots, each segment one token.
//!
//! Tokens are encoded reversibly: `[A-Za-z0-9_-]` stay as they are, every
//! other byte (`.`, `*`, `>`, space, `~`, non-ASCII…) becomes `~XX` (two
//! upper-case hex digits), and the empty value becomes `~`. So any value is
//! one valid subject token, wildcards cannot be smuggled in, and decoding
//! gives back the exact original.

use std::borrow::Cow;
use std::fmt::Write;

pub mod limits;

/// The prefix of every event subject.
pub const EVENT_PREFIX: &str = "hook";

/// Encodes a value as one subject token (see the module docs).
pub fn encode_token(value: &str) -> String {
    if value.is_empty() {
        return "~".to_string();
    }
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "~{b:02X}");
        }
    }
    out
}

/// Why a token does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// A `~` not followed by two hex digits, or a byte outside the alphabet.
    #[error("{0:?} is not an encoded token")]
    Malformed(String),
    /// The decoded bytes are not UTF-8.
    #[error("{0:?} does not decode to UTF-8")]
    NotUtf8(String),
}

/// Decodes a token made by [`encode_token`].
pub fn decode_token(token: &str) -> Result<String, TokenError> {
    decode_token_cow(token).map(Cow::into_owned)
}

/// [`decode_token`] without a copy when the token holds no escape (the
/// usual case: such a token is its own value).
pub fn decode_token_cow(token: &str) -> Result<Cow<'_, str>, TokenError> {
    if token == "~" {
        return Ok(Cow::Borrowed(""));
    }
    let malformed = || TokenError::Malformed(token.to_string());
    let bytes = token.as_bytes();
    if bytes.is_empty() {
        return Err(malformed());
    }
    if !bytes.contains(&b'~') {
        return if bytes.iter().all(|&b| plain(b)) {
            Ok(Cow::Borrowed(token))
        } else {
            Err(malformed())
        };
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'~' => {
                let hex = bytes.get(i + 1..i + 3).ok_or_else(malformed)?;
                let hex = std::str::from_utf8(hex).map_err(|_| malformed())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| malformed())?);
                i += 3;
            }
            b if plain(b) => {
                out.push(b);
                i += 1;
            }
            _ => return Err(malformed()),
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| TokenError::NotUtf8(token.to_string()))
}

/// A byte a token carries as itself.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Encodes an event type: each `.`-separated segment becomes one token, so
/// `order.created` stays `order.created` and wildcards can match segments.
pub fn encode_event_type(event_type: &str) -> String {
    event_type
        .split('.')
        .map(encode_token)
        .collect::<Vec<_>>()
        .join(".")
}

/// FNV-1a, 64 bit: tiny, stable across platforms and languages, and what
/// DESIGN.md fixes for partitioning.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The partition of an entity: FNV-1a 64 of
/// `"<provider token>.<domain token>.<entity token>"` (the encoded subject
/// tokens, joined by `.`) modulo `partitions`.
///
/// Everything that publishes into the mesh — the host, handlers' emits, an
/// outbox relay — must compute it the same way: it is what keeps one
/// entity's events on one partition consumer, and so in order.
pub fn partition(
    provider_token: &str,
    domain_token: &str,
    entity_token: &str,
    partitions: u32,
) -> u32 {
    let key = format!("{provider_token}.{domain_token}.{entity_token}");
    // The remainder is below `partitions`, so it fits in u32.
    (fnv1a64(key.as_bytes()) % u64::from(partitions.max(1))) as u32
}

/// The decoded parts of an event subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventAddress {
    /// The provider (or, for emitted events, the handler).
    pub provider: String,
    /// The domain, e.g. `order`.
    pub domain: String,
    /// The partition number.
    pub partition: u32,
    /// The entity id.
    pub entity: String,
    /// The event type, e.g. `order.created`.
    pub event_type: String,
}

impl EventAddress {
    /// Builds the address of an event, computing its partition.
    pub fn new(
        provider: &str,
        domain: &str,
        entity: &str,
        event_type: &str,
        partitions: u32,
    ) -> Self {
        let partition = partition(
            &encode_token(provider),
            &encode_token(domain),
            &encode_token(entity),
            partitions,
        );
        EventAddress {
            provider: provider.to_string(),
            domain: domain.to_string(),
            partition,
            entity: entity.to_string(),
            event_type: event_type.to_string(),
        }
    }

    /// The subject, `hook.<provider>.<domain>.<partition>.<entity>.<event type…>`.
    pub fn subject(&self) -> String {
        format!(
            "{EVENT_PREFIX}.{}.{}.{}.{}.{}",
            encode_token(&self.provider),
            encode_token(&self.domain),
            self.partition,
            encode_token(&self.entity),
            encode_event_type(&self.event_type)
        )
    }

    /// Parses an event subject back into its parts.
    pub fn parse(subject: &str) -> Result<Self, TokenError> {
        let parts = SubjectParts::parse(subject)?;
        Ok(EventAddress {
            provider: parts.provider.into_owned(),
            domain: parts.domain.into_owned(),
            partition: parts.partition,
            entity: parts.entity.into_owned(),
            event_type: parts.event_type.into_owned(),
        })
    }
}

/// The decoded parts of an event subject, borrowed from it where a token
/// holds no escape: what reading an event needs, without a copy per part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectParts<'a> {
    /// The provider (or, for emitted events, the handler).
    pub provider: Cow<'a, str>,
    /// The domain, e.g. `order`.
    pub domain: Cow<'a, str>,
    /// The partition number.
    pub partition: u32,
    /// The entity id.
    pub entity: Cow<'a, str>,
    /// The event type, e.g. `order.created`.
    pub event_type: Cow<'a, str>,
}

impl<'a> SubjectParts<'a> {
    /// Parses `hook.<provider>.<domain>.<partition>.<entity>.<event type…>`.
    pub fn parse(subject: &'a str) -> Result<Self, TokenError> {
        let malformed = || TokenError::Malformed(subject.to_string());
        let mut tokens = subject.splitn(6, '.');
        if tokens.next() != Some(EVENT_PREFIX) {
            return Err(malformed());
        }
        let mut next = || tokens.next().ok_or_else(malformed);
        let provider = decode_token_cow(next()?)?;
        let domain = decode_token_cow(next()?)?;
        let partition = next()?.parse().map_err(|_| malformed())?;
        let entity = decode_token_cow(next()?)?;
        let event_type = decode_event_type(next()?)?;
        if event_type.is_empty() {
            return Err(malformed());
        }
        Ok(SubjectParts {
            provider,
            domain,
            partition,
            entity,
            event_type,
        })
    }
}

/// Decodes the event type's tokens (`order.created`): the tokens as they
/// stand when none holds an escape.
fn decode_event_type(tokens: &str) -> Result<Cow<'_, str>, TokenError> {
    if !tokens.contains('~') {
        for token in tokens.split('.') {
            decode_token_cow(token)?;
        }
        return Ok(Cow::Borrowed(tokens));
    }
    let decoded = tokens
        .split('.')
        .map(decode_token_cow)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Cow::Owned(decoded.join(".")))
}

/// The default domain of an event type: its first segment, where `.` and `/`
/// both separate (`order.created` → `order`, `orders/create` → `orders`).
pub fn default_domain(event_type: &str) -> &str {
    event_type.split(['.', '/']).next().unwrap_or(event_type)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_tokens_stay_readable() {
        assert_eq!(encode_token("ORD-1"), "ORD-1");
        assert_eq!(encode_token("a_b-C9"), "a_b-C9");
    }

    #[test]
    fn special_bytes_are_escaped() {
        assert_eq!(encode_token(""), "~");
        assert_eq!(encode_token("a.b"), "a~2Eb");
        assert_eq!(encode_token("*"), "~2A");
        assert_eq!(encode_token(">"), "~3E");
        assert_eq!(encode_token("~"), "~7E");
        assert_eq!(encode_token("a b"), "a~20b");
        assert_eq!(encode_token("acme/api"), "acme~2Fapi");
        assert_eq!(encode_token("é"), "~C3~A9");
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in ["", "~4", "~GG", "a.b", "a*", "~FF"] {
            assert!(decode_token(bad).is_err(), "{bad:?} must not decode");
            assert!(decode_token_cow(bad).is_err(), "{bad:?} must not decode");
        }
    }

    #[test]
    fn plain_parts_are_read_in_place_and_escaped_ones_decoded() {
        let plain = SubjectParts::parse("hook.crm.order.6.ORD-1.order.created").expect("parts");
        assert!(matches!(plain.provider, Cow::Borrowed("crm")));
        assert!(matches!(plain.domain, Cow::Borrowed("order")));
        assert_eq!(plain.partition, 6);
        assert!(matches!(plain.entity, Cow::Borrowed("ORD-1")));
        assert!(matches!(plain.event_type, Cow::Borrowed("order.created")));
        let escaped =
            SubjectParts::parse("hook.shop.~.3.gid~3A~2F~2F1.orders~2Fcreate.~").expect("parts");
        assert_eq!(escaped.domain, "");
        assert_eq!(escaped.entity, "gid://1");
        assert_eq!(escaped.event_type, "orders/create.");
        for bad in [
            "hook.crm.order.6.ORD-1",
            "hook.crm.order.x.ORD-1.order.created",
            "hook.crm.order.6.ORD-1.order.",
            "hook.crm.order.6.ORD-1.order..created",
            "hook.crm.order.6.ORD-1.ord*er",
            "hook.crm.order.6.ORD-1.order.~4",
            "hook.crm..6.ORD-1.order.created",
            "hooks.crm.order.6.ORD-1.order.created",
        ] {
            assert!(SubjectParts::parse(bad).is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn fnv1a64_matches_reference_values() {
        // Reference values of the FNV-1a 64-bit specification.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn partition_pins_known_values() {
        // Pinned (cross-checked with an independent FNV-1a implementation): changing the function would move live entities between
        // partitions and break their order. Never change these.
        assert_eq!(partition("crm", "order", "ORD-1", 16), 6);
        assert_eq!(partition("crm", "order", "ORD-2", 16), 3);
        assert_eq!(
            partition("stripe", "charge", "ch_3MmlLrLkdIwHu7ix0snN0B15", 16),
            2
        );
        assert_eq!(partition("crm", "order", "ORD-1", 1), 0);
        assert_eq!(partition("github", "push", "acme~2Fapi", 64), 26);
    }

    #[test]
    fn subject_layout() {
        let address = EventAddress::new("crm", "order", "ORD-1", "order.created", 16);
        assert_eq!(address.subject(), "hook.crm.order.6.ORD-1.order.created");
        assert_eq!(EventAddress::parse(&address.subject()), Ok(address));
        let shop = EventAddress::new(
            "shop",
            "orders",
            "gid://shopify/Order/1",
            "orders/create",
            16,
        );
        let subject = shop.subject();
        assert!(
            subject.ends_with(".gid~3A~2F~2Fshopify~2FOrder~2F1.orders~2Fcreate"),
            "{subject}"
        );
        assert_eq!(EventAddress::parse(&subject), Ok(shop));
    }

    #[test]
    fn default_domain_is_first_segment() {
        assert_eq!(default_domain("order.created"), "order");
        assert_eq!(default_domain("orders/create"), "orders");
        assert_eq!(default_domain("push"), "push");
    }

    /// A valid NATS subject token: non-empty, no `.`, `*`, `>`, whitespace or
    /// control characters.
    fn is_valid_token(token: &str) -> bool {
        !token.is_empty()
            && token
                .chars()
                .all(|c| !matches!(c, '.' | '*' | '>') && !c.is_whitespace() && !c.is_control())
    }

    proptest! {
        #[test]
        fn token_round_trips(value in any::<String>()) {
            let token = encode_token(&value);
            prop_assert!(is_valid_token(&token), "{token:?}");
            prop_assert_eq!(decode_token(&token), Ok(value));
        }

        #[test]
        fn subject_round_trips(
            provider in "[a-z][a-z0-9_-]{0,10}",
            domain in any::<String>(),
            entity in any::<String>(),
            event_type in any::<String>().prop_filter("non-empty", |s| !s.is_empty()),
            partitions in 1u32..64,
        ) {
            let address = EventAddress::new(&provider, &domain, &entity, &event_type, partitions);
            prop_assert!(address.partition < partitions);
            let subject = address.subject();
            prop_assert!(subject.split('.').all(is_valid_token), "{subject:?}");
            prop_assert_eq!(EventAddress::parse(&subject), Ok(address));
        }
    }
}
