//! [`AppStore`]: the store chosen by `RATE_LIMIT_STORE`, behind one type so
//! the router is the same whichever it is.

use std::future::{Future, Ready};
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tollgate::rate_limit::{
    Check, Decisions, MemoryStore, RedisFuture, RedisStore, RedisTarget, Store, StoreError,
};

use crate::config::StoreConfig;

/// The rate-limit store of this replica.
#[derive(Debug, Clone)]
pub enum AppStore {
    /// Counts in this process.
    Memory(MemoryStore),
    /// Counts in Redis, for the fleet.
    Redis(RedisStore),
}

impl AppStore {
    /// The store `config` asks for. Connects to Redis lazily: a Redis that
    /// is down at start-up is handled by the failure policy, not fatal.
    pub fn new(config: &StoreConfig) -> Result<Self, StoreError> {
        Ok(match config {
            StoreConfig::Memory => Self::Memory(MemoryStore::new()),
            StoreConfig::Redis {
                url,
                cluster_nodes,
                prefix,
                timeout,
                max_batch,
                max_in_flight,
                local_cache,
            } => {
                let target = if cluster_nodes.is_empty() {
                    RedisTarget::Single(url.clone())
                } else {
                    RedisTarget::Cluster(cluster_nodes.clone())
                };
                Self::Redis(
                    RedisStore::builder(target)
                        .prefix(prefix.clone())
                        .timeout(*timeout)
                        .max_batch(*max_batch)
                        .max_in_flight(*max_in_flight)
                        .local_cache(*local_cache)
                        .build()?,
                )
            }
        })
    }
}

impl Store for AppStore {
    type Future = AppStoreFuture;

    fn check(&self, checks: &[Check]) -> Self::Future {
        match self {
            Self::Memory(store) => AppStoreFuture::Memory {
                future: store.check(checks),
            },
            Self::Redis(store) => AppStoreFuture::Redis {
                future: store.check(checks),
            },
        }
    }
}

pin_project! {
    /// The future of an [`AppStore`] check.
    #[project = AppStoreFutureProj]
    #[allow(missing_docs)]
    pub enum AppStoreFuture {
        Memory { #[pin] future: Ready<Result<Decisions, StoreError>> },
        Redis { #[pin] future: RedisFuture },
    }
}

impl Future for AppStoreFuture {
    type Output = Result<Decisions, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AppStoreFutureProj::Memory { future } => future.poll(cx),
            AppStoreFutureProj::Redis { future } => future.poll(cx),
        }
    }
}
