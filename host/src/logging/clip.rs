//! Untrusted values in log lines: shortened and escaped, so a client cannot
//! flood the log with one huge key or forge lines with control characters.

use std::fmt;

/// How many characters of an untrusted value a log line shows.
pub const CLIP_CHARS: usize = 64;

/// A value as a log line shows it; see [`clip`].
#[derive(Debug, Clone, Copy)]
pub struct Clipped<'a>(&'a str);

/// Shows at most [`CLIP_CHARS`] characters of `value`, escaped like a Rust
/// string literal's contents, then `…(N bytes)` with the full length.
pub fn clip(value: &str) -> Clipped<'_> {
    Clipped(value)
}

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.chars();
        for c in chars.by_ref().take(CLIP_CHARS) {
            write!(f, "{}", c.escape_debug())?;
        }
        if chars.next().is_some() {
            write!(f, "…({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_shown_whole_and_long_ones_clipped() {
        assert_eq!(clip("crm:msg_1").to_string(), "crm:msg_1");
        let exact = "a".repeat(CLIP_CHARS);
        assert_eq!(clip(&exact).to_string(), exact);
        let long = "k".repeat(5000);
        let shown = clip(&long).to_string();
        assert_eq!(shown, format!("{}…(5000 bytes)", "k".repeat(CLIP_CHARS)));
        assert_eq!(clip("a\nb").to_string(), "a\\nb");
        assert!(clip(&"é".repeat(100)).to_string().ends_with("…(200 bytes)"));
    }
}
