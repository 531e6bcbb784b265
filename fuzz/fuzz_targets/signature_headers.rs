//! Every signature scheme's header parsing and verification, on arbitrary
//! headers and bodies: no panic, and a request signed the scheme's way
//! always verifies (for any body and message id).
//!
//! Input: one byte choosing the scheme, then `name: value` header lines,
//! an empty line, the body.

#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use hookmesh::verify::{Encoding, GenericHmac, Scheme, SecretKey, Verifier, sign};
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;

fn schemes() -> Vec<Scheme> {
    vec![
        Scheme::StandardWebhooks,
        Scheme::Stripe,
        Scheme::Github,
        Scheme::Shopify,
        Scheme::Hmac(GenericHmac {
            signature_header: "x-signature".into(),
            encoding: Encoding::Hex,
            prefix: Some("sha256=".into()),
            timestamp_header: Some("x-timestamp".into()),
        }),
        Scheme::Hmac(GenericHmac {
            signature_header: "x-signature".into(),
            encoding: Encoding::Base64,
            prefix: None,
            timestamp_header: None,
        }),
    ]
}

fn secret(scheme: &Scheme) -> SecretKey {
    let raw = match scheme {
        Scheme::StandardWebhooks => "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        _ => "fuzz-secret",
    };
    SecretKey::parse(scheme, raw).expect("a valid test secret")
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let schemes = schemes();
    let scheme = &schemes[usize::from(choice) % schemes.len()];
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let verifier = Verifier {
        scheme: scheme.clone(),
        secrets: vec![secret(scheme)],
        tolerance: Duration::from_secs(300),
    };
    let (headers, body) = hookmesh_fuzz::request(rest);
    let _ = verifier.verify(&headers, body, now);

    // What the scheme's provider would send verifies. The message id is
    // the first header's value, when there is one.
    let id = headers
        .values()
        .next()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("msg_1");
    let mut signed = HeaderMap::new();
    for (name, value) in sign(scheme, &secret(scheme), id, body, now) {
        signed.append(name, value);
    }
    let verified = verifier.verify(&signed, body, now);
    // A message id that is not a valid header value is left out, and then
    // reported missing; anything else must verify.
    let id_sent = !matches!(scheme, Scheme::StandardWebhooks) || signed.contains_key("webhook-id");
    if id_sent {
        assert!(verified.is_ok(), "{scheme:?} {id:?}: {verified:?}");
    }
});
