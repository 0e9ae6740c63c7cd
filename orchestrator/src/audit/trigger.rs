//! When to write the next checkpoint, pure: after `every_events` new events, or after
//! `every_ms` when there was at least one new event since the last checkpoint.

/// The checkpoint policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Events between checkpoints at most (default 1000).
    pub every_events: u64,
    /// Milliseconds between checkpoints at most, while there are new events (default 10 min).
    pub every_ms: u64,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_events: 1000,
            every_ms: 10 * 60 * 1000,
        }
    }
}

/// What the trigger remembers: how many events the last checkpoint covered and when it was
/// made (or when the writer started, before its first checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerState {
    pub last_events: u64,
    pub last_ms: u64,
}

/// Whether a checkpoint is due now, with `events` events in the log.
pub fn due(policy: &CheckpointPolicy, state: &TriggerState, events: u64, now_ms: u64) -> bool {
    if events <= state.last_events {
        return false;
    }
    events - state.last_events >= policy.every_events.max(1)
        || now_ms.saturating_sub(state.last_ms) >= policy.every_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_after_n_events_or_m_minutes_with_new_events() {
        let policy = CheckpointPolicy {
            every_events: 1000,
            every_ms: 600_000,
        };
        let at = |last_events, last_ms| TriggerState {
            last_events,
            last_ms,
        };
        // (state, log seq, now, due)
        let cases = [
            (at(0, 0), 0, 10_000_000, false),       // nothing ever written
            (at(0, 0), 999, 1, false),              // not yet 1000 events, not yet 10 min
            (at(0, 0), 1000, 1, true),              // 1000 events
            (at(5000, 0), 5999, 599_999, false),    // just below both
            (at(5000, 0), 6000, 0, true),           // 1000 more events
            (at(5000, 0), 5001, 600_000, true),     // 10 minutes and one new event
            (at(5000, 0), 5000, 99_000_000, false), // 10 minutes but no new event
            (at(5000, 700), 5001, 600_000, false),  // clock: only 599.3 s since
            (at(5000, 0), 4000, 99_000_000, false), // a log behind the checkpoint
        ];
        for (state, events, now, want) in cases {
            assert_eq!(
                due(&policy, &state, events, now),
                want,
                "{state:?} log {events} now {now}"
            );
        }
    }

    #[test]
    fn a_zero_event_count_means_every_new_event() {
        let policy = CheckpointPolicy {
            every_events: 0,
            every_ms: u64::MAX,
        };
        let state = TriggerState {
            last_events: 3,
            last_ms: 0,
        };
        assert!(!due(&policy, &state, 3, 1));
        assert!(due(&policy, &state, 4, 1));
    }
}
