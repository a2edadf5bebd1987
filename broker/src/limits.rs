//! Why the broker closed or refused a connection, and the rate limit of
//! the log lines that say so (the metrics count every one). Below
//! `broker` in the module order: the broker holds the rate limit.

use std::sync::atomic::{AtomicU64, Ordering};

/// Shortest time between two log lines about the same kind of closed or
/// refused connection (the metrics count every one).
pub const LIMIT_LOG_INTERVAL_MS: u64 = 5_000;

/// Why the broker closed or refused a connection (the `reason` label of
/// `weir_connections_closed_total` and `weir_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitReason {
    /// No request, subscription or byte for `connections_max_idle_ms`.
    Idle,
    /// A frame begun but not finished within `frame_timeout_ms`.
    FrameTimeout,
    /// A response or push not sent within `frame_timeout_ms` (the peer
    /// stopped reading).
    SendTimeout,
    /// `connections_max` reached.
    BrokerLimit,
    /// `connections_max_per_address` reached for the peer's address.
    AddressLimit,
}

impl LimitReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            LimitReason::Idle => "idle",
            LimitReason::FrameTimeout => "frame_timeout",
            LimitReason::SendTimeout => "send_timeout",
            LimitReason::BrokerLimit => "broker_limit",
            LimitReason::AddressLimit => "address_limit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Rate limit of the log lines about limits, one clock per reason.
#[derive(Debug, Default)]
pub struct LimitLog {
    last_ms: [AtomicU64; 5],
}

impl LimitLog {
    /// Whether a line about `reason` may be logged now (at most one per
    /// [`LIMIT_LOG_INTERVAL_MS`]).
    pub fn due(&self, reason: LimitReason, now_ms: u64) -> bool {
        let last = &self.last_ms[reason.index()];
        let previous = last.load(Ordering::Relaxed);
        (previous == 0 || now_ms >= previous + LIMIT_LOG_INTERVAL_MS)
            && last
                .compare_exchange(previous, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limit log lets one line per reason through per interval.
    #[test]
    fn limit_lines_are_rate_limited_per_reason() {
        let log = LimitLog::default();
        assert!(log.due(LimitReason::Idle, 10_000));
        assert!(!log.due(LimitReason::Idle, 10_001));
        assert!(log.due(LimitReason::FrameTimeout, 10_001), "another reason");
        assert!(log.due(LimitReason::Idle, 10_000 + LIMIT_LOG_INTERVAL_MS));
    }
}
