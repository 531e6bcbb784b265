//! How much of a guest's `log` output reaches the host's log: a budget of
//! lines and bytes per invocation (the manifest's `max_log_lines` and
//! `max_log_bytes`), each line cut at [`MAX_LINE_BYTES`]. A guest that logs
//! past the budget gets one notice written in its name, and the invocation
//! goes on: logging is never a reason to fail an event.

/// The longest line written for a guest; the rest of a longer one is
/// replaced by a marker saying how much was cut.
pub const MAX_LINE_BYTES: usize = 8 << 10;

/// What one `log` call may write.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Write the first `keep` bytes of the message (`cut` bytes of it are
    /// left out; 0 when it fits whole).
    Write {
        /// Bytes of the message to write (on a char boundary).
        keep: usize,
        /// Bytes left out.
        cut: usize,
    },
    /// The budget has just run out: write the truncation notice instead
    /// of this message, once.
    Notice,
    /// The budget ran out earlier: write nothing.
    Drop,
}

/// The log budget of one invocation.
#[derive(Debug)]
pub struct LogBudget {
    max_lines: u32,
    max_bytes: u64,
    lines: u32,
    bytes: u64,
    dropped: u64,
}

impl LogBudget {
    /// A budget of `max_lines` lines and `max_bytes` bytes of messages.
    pub fn new(max_lines: u32, max_bytes: u64) -> Self {
        LogBudget {
            max_lines,
            max_bytes,
            lines: 0,
            bytes: 0,
            dropped: 0,
        }
    }

    /// Whether the budget ran out: every further line is dropped unread.
    pub fn spent(&self) -> bool {
        self.dropped > 0
    }

    /// Counts a line dropped without reading it (the budget is spent).
    pub fn drop_line(&mut self) -> Admit {
        self.dropped += 1;
        if self.dropped == 1 {
            Admit::Notice
        } else {
            Admit::Drop
        }
    }

    /// Decides about a message of `len` bytes whose first bytes are
    /// `prefix` (at least [`MAX_LINE_BYTES`] of them, or all, less a
    /// partial character): no more of a message is ever read out of the
    /// guest than can be written.
    pub fn admit(&mut self, len: usize, prefix: &str) -> Admit {
        let room = self.max_bytes - self.bytes;
        if self.spent() || self.lines >= self.max_lines || (room == 0 && len > 0) {
            return self.drop_line();
        }
        let want = len.min(MAX_LINE_BYTES);
        let by_budget = room < want as u64;
        let allowed = if by_budget { room as usize } else { want };
        let keep = if allowed < len {
            floor_boundary(prefix, allowed)
        } else {
            len
        };
        self.lines += 1;
        self.bytes += keep as u64;
        // A line cut by the byte budget (not by the line cap) uses it up:
        // the next line gets the notice.
        if by_budget {
            self.bytes = self.max_bytes;
        }
        Admit::Write {
            keep,
            cut: len - keep,
        }
    }

    /// Lines left out after the budget ran out (the one the notice took
    /// the place of included).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The budget (lines, bytes), for the notice.
    pub fn limits(&self) -> (u32, u64) {
        (self.max_lines, self.max_bytes)
    }
}

/// The prefix of `text` that [`LogBudget::admit`] needs: at most
/// [`MAX_LINE_BYTES`], ending on a char boundary.
pub fn prefix(text: &str) -> &str {
    &text[..floor_boundary(text, MAX_LINE_BYTES)]
}

/// The char boundary of `text` at or below `index`.
fn floor_boundary(text: &str, index: usize) -> usize {
    let mut index = index.min(text.len());
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(budget: &mut LogBudget, text: &str) -> Admit {
        budget.admit(text.len(), prefix(text))
    }

    #[test]
    fn lines_within_the_budget_are_written_whole() {
        let mut budget = LogBudget::new(3, 100);
        for _ in 0..3 {
            assert_eq!(
                admit(&mut budget, "hello"),
                Admit::Write { keep: 5, cut: 0 }
            );
        }
        assert!(!budget.spent());
    }

    #[test]
    fn past_the_line_budget_one_notice_then_nothing() {
        let mut budget = LogBudget::new(2, 1 << 20);
        admit(&mut budget, "a");
        admit(&mut budget, "b");
        assert_eq!(admit(&mut budget, "c"), Admit::Notice);
        assert_eq!(admit(&mut budget, "dd"), Admit::Drop);
        assert_eq!(admit(&mut budget, "eee"), Admit::Drop);
        assert!(budget.spent());
        assert_eq!(budget.dropped(), 3);
    }

    #[test]
    fn a_long_line_is_cut_at_the_line_cap_and_counted_against_the_bytes() {
        let mut budget = LogBudget::new(100, 1 << 20);
        let line = "x".repeat(1 << 20);
        assert_eq!(
            admit(&mut budget, &line),
            Admit::Write {
                keep: MAX_LINE_BYTES,
                cut: (1 << 20) - MAX_LINE_BYTES
            }
        );
        assert!(!budget.spent(), "a cut line alone is not a truncation");
        let accented = format!("{}é", "x".repeat(MAX_LINE_BYTES - 1));
        assert_eq!(
            admit(&mut budget, &accented),
            Admit::Write {
                keep: MAX_LINE_BYTES - 1,
                cut: 2
            }
        );
        assert_eq!(admit(&mut budget, "next"), Admit::Write { keep: 4, cut: 0 });
    }

    #[test]
    fn the_byte_budget_cuts_the_line_that_crosses_it_then_notices() {
        let mut budget = LogBudget::new(100, 10);
        assert_eq!(
            admit(&mut budget, "12345678"),
            Admit::Write { keep: 8, cut: 0 }
        );
        assert_eq!(
            admit(&mut budget, "abcdef"),
            Admit::Write { keep: 2, cut: 4 }
        );
        assert_eq!(admit(&mut budget, "z"), Admit::Notice);
        assert_eq!(admit(&mut budget, ""), Admit::Drop);
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        let mut budget = LogBudget::new(10, 5);
        // "é" is two bytes: 5 bytes of "ééé" end inside the third.
        assert_eq!(admit(&mut budget, "ééé"), Admit::Write { keep: 4, cut: 2 });
    }

    #[test]
    fn two_hundred_one_mib_lines_write_at_most_the_budget() {
        let mut budget = LogBudget::new(1_000, 256 << 10);
        let line = "y".repeat(1 << 20);
        let mut written = 0;
        let mut notices = 0;
        for _ in 0..200 {
            match admit(&mut budget, &line) {
                Admit::Write { keep, .. } => written += keep,
                Admit::Notice => notices += 1,
                Admit::Drop => {}
            }
        }
        assert!(written <= 256 << 10, "{written}");
        assert_eq!(notices, 1);
    }
}
