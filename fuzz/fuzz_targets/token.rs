//! The subject token codec: any text encodes to one valid NATS subject
//! token that decodes back to it exactly; an event address survives its
//! subject; KV keys stay in the KV alphabet; decoding arbitrary tokens
//! never panics.
//!
//! Input: UTF-8 text; `\n` separates the parts of an event address
//! (provider, domain, entity, event type).

#![no_main]

use hookmesh::extract::kv_key;
use hookmesh::subject::{EventAddress, decode_token, encode_event_type, encode_token};
use libfuzzer_sys::fuzz_target;

/// A token NATS takes inside a subject: not empty, no separator, no
/// wildcard, no whitespace or control character — and with the codec's
/// alphabet, plain ASCII.
fn is_subject_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'~')
}

fuzz_target!(|data: &[u8]| {
    let _ = decode_token(&String::from_utf8_lossy(data));
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    let token = encode_token(text);
    assert!(is_subject_token(&token), "{text:?} → {token:?}");
    assert_eq!(decode_token(&token).as_deref(), Ok(text), "{token:?}");

    for segment in encode_event_type(text).split('.') {
        assert!(is_subject_token(segment), "{text:?} → {segment:?}");
    }

    let key = kv_key(text);
    assert!(
        key.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
        "{text:?} → {key:?}"
    );

    let mut parts = text.splitn(4, '\n');
    let (provider, domain, entity, event_type) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("order.created"),
    );
    if event_type.is_empty() {
        return;
    }
    let address = EventAddress::new(provider, domain, entity, event_type, 16);
    let subject = address.subject();
    assert!(subject.split('.').all(is_subject_token), "{subject:?}");
    assert_eq!(EventAddress::parse(&subject).as_ref(), Ok(&address), "{subject:?}");
});
