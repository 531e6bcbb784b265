//! Who may change state through the admin listener: whoever presents
//! `[admin] token`. One shared token names no person, so a console action
//! is recorded as `console`, or `console:<name>` with the name the operator
//! typed.

use sha2::{Digest, Sha256};

use crate::config::Redacted;

/// Why a state change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `[admin] token` is configured: the admin listener only reads.
    #[error("this host has no [admin] token configured, so nothing can be changed here")]
    NotConfigured,
    /// The token is missing or wrong.
    #[error("the admin token is missing or wrong")]
    WrongToken,
}

/// Checks `given` against the configured token, in time independent of
/// where they differ (and of their lengths).
pub fn check(configured: Option<&Redacted>, given: &str) -> Result<(), Refusal> {
    let configured = configured.ok_or(Refusal::NotConfigured)?;
    let (a, b) = (
        Sha256::digest(configured.0.as_bytes()),
        Sha256::digest(given.as_bytes()),
    );
    let differ = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    if differ == 0 {
        Ok(())
    } else {
        Err(Refusal::WrongToken)
    }
}

/// The longest name kept in an actor.
const MAX_NAME_CHARS: usize = 64;

/// The audit actor of a console action: `console`, or `console:<name>`
/// with the typed name trimmed, cut to 64 characters and stripped of
/// anything but letters, digits and `.-_@ `.
pub fn actor(name: Option<&str>) -> String {
    let name: String = name
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_' | '@' | ' '))
        .take(MAX_NAME_CHARS)
        .collect();
    let name = name.trim();
    if name.is_empty() {
        "console".to_string()
    } else {
        format!("console:{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_configured_token_passes() {
        let token = Redacted("a-long-enough-admin-token".into());
        assert_eq!(check(Some(&token), "a-long-enough-admin-token"), Ok(()));
        assert_eq!(
            check(Some(&token), "a-long-enough-admin-tokeN"),
            Err(Refusal::WrongToken)
        );
        assert_eq!(check(Some(&token), ""), Err(Refusal::WrongToken));
        assert_eq!(check(None, "anything"), Err(Refusal::NotConfigured));
        assert_eq!(check(None, ""), Err(Refusal::NotConfigured));
    }

    #[test]
    fn actors_name_the_console_and_keep_only_a_plain_name() {
        assert_eq!(actor(None), "console");
        assert_eq!(actor(Some("  ")), "console");
        assert_eq!(actor(Some("anna")), "console:anna");
        assert_eq!(actor(Some("<b>anna</b>\n")), "console:bannab");
        assert_eq!(actor(Some(&"x".repeat(100))).len(), "console:".len() + 64);
    }
}
