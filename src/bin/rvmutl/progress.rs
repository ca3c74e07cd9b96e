//! Progress on standard error for long commands (indicatif): bytes done and
//! total, rate and time left; a spinner with the elapsed time where the
//! total is not known. Shown only when standard error is a terminal and
//! `--quiet` was not given ([`should_show`]).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// Whether to draw progress: only on a terminal, and never with `--quiet`.
/// (Piped or redirected standard error, as in scripts and CI, gets none.)
pub(crate) fn should_show(quiet: bool, stderr_is_terminal: bool) -> bool {
    !quiet && stderr_is_terminal
}

/// A progress display; hidden when [`should_show`] says no.
pub(crate) struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn target(quiet: bool) -> ProgressDrawTarget {
        if should_show(quiet, std::io::stderr().is_terminal()) {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        }
    }

    /// A bar counting `total` bytes (the total may be raised later).
    pub(crate) fn bytes(quiet: bool, message: impl Into<String>, total: u64) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(total), Self::target(quiet));
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}, {eta} left",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(message.into());
        Progress { bar }
    }

    /// A spinner with the elapsed time, for work whose progress the tool
    /// cannot see.
    pub(crate) fn spinner(quiet: bool, message: impl Into<String>) -> Progress {
        let bar = ProgressBar::with_draw_target(None, Self::target(quiet));
        let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_message(message.into());
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress { bar }
    }

    /// Changes the message.
    pub(crate) fn message(&self, message: impl Into<String>) {
        self.bar.set_message(message.into());
    }

    /// Records `done` of `total` bytes.
    pub(crate) fn set(&self, done: u64, total: u64) {
        if self.bar.length() != Some(total.max(done)) {
            self.bar.set_length(total.max(done));
        }
        self.bar.set_position(done);
    }

    /// Removes the display.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_only_on_a_terminal_and_never_when_quiet() {
        assert!(should_show(false, true));
        assert!(!should_show(true, true));
        assert!(!should_show(false, false));
        assert!(!should_show(true, false));
    }

    #[test]
    fn a_hidden_bar_still_counts() {
        let p = Progress::bytes(true, "reading", 100);
        p.set(150, 100);
        assert_eq!((p.bar.position(), p.bar.length()), (150, Some(150)));
        assert!(p.bar.is_hidden());
        p.finish();
        assert!(p.bar.is_finished());
    }
}
