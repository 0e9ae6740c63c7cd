//! Progress of a running step: the counters the repository's pipelines advance (from their own
//! threads), the cancel flag they poll, and the heartbeat rule that decides when the executing
//! thread reports them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::repo::Progress;

/// A step whose byte counter has not moved for this long stops heartbeating, so that the
/// orchestrator's heartbeat timeout fires for a transfer stuck in the kernel (a hung NFS read)
/// instead of the job showing "running" forever.
pub const STALL_LIMIT: Duration = Duration::from_secs(600);

/// Byte counters and the cancel flag of one step attempt. Shared by reference between the
/// executing thread (which reads it) and the step's threads (which advance it).
#[derive(Debug)]
pub(crate) struct StepProgress<'a> {
    cancel: &'a AtomicBool,
    done: AtomicU64,
    total: AtomicU64,
}

impl<'a> StepProgress<'a> {
    pub(crate) fn new(cancel: &'a AtomicBool, total: u64) -> StepProgress<'a> {
        StepProgress {
            cancel,
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
        }
    }

    /// `(bytes_done, bytes_total)` now.
    pub(crate) fn counts(&self) -> (u64, u64) {
        let done = self.done.load(Ordering::Relaxed);
        (done, self.total.load(Ordering::Relaxed).max(done))
    }

    /// Sets the total before the repository starts (it learns the size later than the step).
    pub(crate) fn start_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

impl Progress for StepProgress<'_> {
    fn start(&self, _what: &str, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    fn finish(&self) {
        self.done
            .store(self.total.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn cancelled(&self) -> bool {
        self.is_cancelled()
    }
}

/// Decides, at each tick of the executing thread, whether to send a heartbeat: always, unless
/// the byte counter has been still for [`STALL_LIMIT`].
#[derive(Debug)]
pub(crate) struct Heartbeat {
    last_done: u64,
    last_change: Instant,
    stall_limit: Duration,
}

impl Heartbeat {
    pub(crate) fn new(now: Instant, stall_limit: Duration) -> Heartbeat {
        Heartbeat {
            last_done: 0,
            last_change: now,
            stall_limit,
        }
    }

    /// Whether to report `bytes_done` at `now`.
    pub(crate) fn due(&mut self, now: Instant, bytes_done: u64) -> bool {
        if bytes_done != self.last_done {
            self.last_done = bytes_done;
            self.last_change = now;
        }
        now.saturating_duration_since(self.last_change) < self.stall_limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_stop_only_after_a_long_stall() {
        let t0 = Instant::now();
        let secs = |s| t0 + Duration::from_secs(s);
        let mut beat = Heartbeat::new(t0, Duration::from_secs(60));
        assert!(beat.due(secs(1), 0), "a step without bytes yet still beats");
        assert!(beat.due(secs(59), 0));
        assert!(!beat.due(secs(60), 0), "60 s without progress: stalled");
        assert!(beat.due(secs(61), 4096), "progress resumes the heartbeats");
        assert!(beat.due(secs(120), 4096));
        assert!(!beat.due(secs(121), 4096));
    }

    #[test]
    fn counters_follow_the_repository_calls() {
        let cancel = AtomicBool::new(false);
        let progress = StepProgress::new(&cancel, 100);
        assert_eq!(progress.counts(), (0, 100));
        progress.start("backup", 1000);
        progress.advance(300);
        progress.advance(200);
        assert_eq!(progress.counts(), (500, 1000));
        assert!(!progress.cancelled());
        cancel.store(true, Ordering::Relaxed);
        assert!(progress.cancelled());
        progress.finish();
        assert_eq!(progress.counts(), (1000, 1000));
    }
}
