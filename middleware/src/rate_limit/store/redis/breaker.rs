//! A circuit breaker per Redis node.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

/// Consecutive failures of one node; open stops sending to it.
#[derive(Default)]
pub(super) struct Breaker {
    failures: AtomicU32,
    open: AtomicBool,
}

/// Nodes whose breaker is open, for the store-wide gauge.
static OPEN_NODES: AtomicUsize = AtomicUsize::new(0);

/// Whether any node's breaker (of any store in this process) is open: a
/// check's fast path, so that without failures no request reads the
/// topology to look for one.
pub(super) fn any_open() -> bool {
    OPEN_NODES.load(Ordering::Acquire) > 0
}

impl Breaker {
    pub(super) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    pub(super) fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failure; `true` when it opened the breaker (then the
    /// caller starts a probe).
    pub(super) fn failure(&self, threshold: u32, node: &str) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= threshold && !self.open.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                failures,
                node,
                "redis rate-limit node unavailable; its keys fail over to the failure policy"
            );
            node_gauge(node, 0.0);
            fallback_gauge(OPEN_NODES.fetch_add(1, Ordering::AcqRel) + 1);
            return true;
        }
        false
    }

    /// Closes the breaker after a probe got an answer.
    pub(super) fn close(&self, node: &str) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::info!(node, "redis rate-limit node reachable again; back in use");
            node_gauge(node, 1.0);
            fallback_gauge(OPEN_NODES.fetch_sub(1, Ordering::AcqRel) - 1);
        }
    }
}

impl Drop for Breaker {
    fn drop(&mut self) {
        // A store dropped with an open breaker no longer fails over.
        if *self.open.get_mut() {
            fallback_gauge(OPEN_NODES.fetch_sub(1, Ordering::AcqRel) - 1);
        }
    }
}

/// `tollgate_ratelimit_fallback_active`: 1 while any node's breaker is
/// open.
pub(super) fn fallback_gauge(open_nodes: usize) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(crate::metrics::RATELIMIT_FALLBACK_ACTIVE).set(if open_nodes > 0 {
        1.0
    } else {
        0.0
    });
    #[cfg(not(feature = "metrics"))]
    let _ = open_nodes;
}

/// `tollgate_ratelimit_redis_node_up{node}`: 0 while the node's breaker is
/// open.
pub(super) fn node_gauge(node: &str, value: f64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(crate::metrics::RATELIMIT_REDIS_NODE_UP, "node" => node.to_owned()).set(value);
    #[cfg(not(feature = "metrics"))]
    let _ = (node, value);
}
