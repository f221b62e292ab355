//! The manager's recent log lines, kept in memory for `hyco manager logs`.
//!
//! The binary's log writer hands every formatted line to [`LogBuffer::push`]; the buffer keeps
//! the last [`LogBuffer::CAPACITY`] lines and broadcasts new ones to followers. Log lines never
//! carry secrets (keys and tokens are not logged anywhere), so nothing is filtered here.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::broadcast;

/// Recent log lines and a feed of new ones.
pub struct LogBuffer {
    lines: Mutex<VecDeque<String>>,
    feed: broadcast::Sender<String>,
}

impl Default for LogBuffer {
    fn default() -> Self {
        LogBuffer {
            lines: Mutex::new(VecDeque::with_capacity(Self::CAPACITY)),
            feed: broadcast::channel(1024).0,
        }
    }
}

impl LogBuffer {
    /// Lines kept.
    pub const CAPACITY: usize = 2000;

    /// Records one line (without its newline).
    pub fn push(&self, line: &str) {
        let line = line.trim_end_matches(['\n', '\r']).to_owned();
        {
            let mut g = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            if g.len() == Self::CAPACITY {
                g.pop_front();
            }
            g.push_back(line.clone());
        }
        let _ = self.feed.send(line);
    }

    /// The last `n` lines, oldest first.
    pub fn recent(&self, n: usize) -> Vec<String> {
        let g = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        g.iter().skip(g.len().saturating_sub(n)).cloned().collect()
    }

    /// New lines from now on (a follower that falls 1024 lines behind skips ahead).
    pub fn follow(&self) -> broadcast::Receiver<String> {
        self.feed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_in_order() {
        let b = LogBuffer::default();
        for i in 0..(LogBuffer::CAPACITY + 5) {
            b.push(&format!("line {i}\n"));
        }
        let r = b.recent(3);
        let last = LogBuffer::CAPACITY + 4;
        assert_eq!(
            r,
            [
                format!("line {}", last - 2),
                format!("line {}", last - 1),
                format!("line {last}")
            ]
        );
        assert_eq!(b.recent(usize::MAX).len(), LogBuffer::CAPACITY);
    }
}
