//! Stopping without cutting anyone off: what a worker does between SIGTERM and exit.
//!
//! ```text
//!   SIGTERM ─> readiness NOT_SERVING at once (the Service stops sending new work)
//!          ─> keep accepting for the unready delay (min(5 s, budget / 2)): endpoints
//!             and kube-proxy catch up; calls that still arrive are served
//!          ─> stop accepting; HTTP/2 GOAWAY; in-flight calls run to their end
//!          ─> budget spent (from SIGTERM): calls still running end with UNAVAILABLE,
//!             saying the worker is shutting down ([`Drain::expired`]); exit
//! ```
//!
//! The operator sets the budget from `spec.serving.drainSeconds` and the pod's
//! `terminationGracePeriodSeconds` a little above it, so the kubelet's SIGKILL never comes
//! first.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Longest the worker keeps accepting new calls after SIGTERM.
const MAX_UNREADY_DELAY: Duration = Duration::from_secs(5);

/// The drain budget: how long after SIGTERM in-flight calls may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct DrainArgs {
    /// Seconds after SIGTERM that in-flight calls may take to finish (readiness turns
    /// NOT_SERVING at once; new calls are still taken for min(5, this / 2) seconds while
    /// the Service catches up); calls still running then end with UNAVAILABLE.
    #[arg(
        long = "drain-seconds",
        env = "SWITCHYARD_DRAIN_SECONDS",
        default_value_t = 30
    )]
    pub seconds: u64,
}

impl Default for DrainArgs {
    fn default() -> Self {
        Self { seconds: 30 }
    }
}

impl DrainArgs {
    /// The whole budget, from SIGTERM.
    pub fn budget(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }

    /// How long new calls are still accepted after SIGTERM.
    pub fn unready_delay(&self) -> Duration {
        (self.budget() / 2).min(MAX_UNREADY_DELAY)
    }
}

/// Shared between the server, which says when the budget is spent, and the services,
/// whose in-flight calls end then.
#[derive(Debug, Clone)]
pub struct Drain {
    expired: Arc<watch::Sender<bool>>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            expired: Arc::new(watch::Sender::new(false)),
        }
    }
}

impl Drain {
    /// The budget is spent: every [`Drain::expired`] resolves.
    pub fn expire(&self) {
        self.expired.send_replace(true);
    }

    /// Resolves once the drain budget is spent (never while the worker serves).
    pub async fn expired(&self) {
        let mut rx = self.expired.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = rx.wait_for(|expired| *expired).await;
    }

    /// The status a call still running when the budget ran out ends with.
    pub fn status() -> tonic::Status {
        tonic::Status::unavailable(
            "this worker is shutting down and its drain budget ran out before the call \
             finished; retry it (another replica will take it)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unready_delay_is_half_the_budget_at_most_five_seconds() {
        let d = |s| DrainArgs { seconds: s }.unready_delay();
        assert_eq!(d(0), Duration::ZERO);
        assert_eq!(d(2), Duration::from_secs(1));
        assert_eq!(d(30), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn expired_resolves_only_after_expire_for_every_waiter() {
        let drain = Drain::default();
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.expired().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drain.expire();
        waiter.await.unwrap();
        // A waiter that starts after the fact resolves at once.
        tokio::time::timeout(Duration::from_secs(1), drain.expired())
            .await
            .unwrap();
    }
}
