//! [`EitherStore`]: one of two stores, chosen at run time.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use super::{Check, Decisions, Store, StoreError};

/// One of two stores, chosen at run time (say, from configuration), behind
/// one type, so the layers above it have one type whichever it is. Checks
/// cost what the chosen store's cost: no boxing, no allocation.
///
/// Nest it for more than two (`EitherStore<A, EitherStore<B, C>>`).
///
/// ```
/// use tollgate::rate_limit::{EitherStore, MemoryStore, RateLimitLayer, RedisStore};
///
/// # fn run() -> Result<(), tollgate::rate_limit::StoreError> {
/// let redis_url = std::env::var("REDIS_URL").ok();
/// let store: EitherStore<MemoryStore, RedisStore> = match redis_url {
///     Some(url) => EitherStore::Right(RedisStore::new(&url)?),
///     None => EitherStore::Left(MemoryStore::new()),
/// };
/// let layer = RateLimitLayer::new(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(async { run().unwrap() });
/// ```
#[derive(Debug, Clone)]
pub enum EitherStore<A, B> {
    /// The first kind.
    Left(A),
    /// The second kind.
    Right(B),
}

impl<A: Store, B: Store> Store for EitherStore<A, B> {
    type Future = EitherFuture<A::Future, B::Future>;

    fn check(&self, checks: &[Check]) -> Self::Future {
        match self {
            Self::Left(store) => EitherFuture::Left {
                future: store.check(checks),
            },
            Self::Right(store) => EitherFuture::Right {
                future: store.check(checks),
            },
        }
    }

    fn is_available(&self) -> bool {
        match self {
            Self::Left(store) => store.is_available(),
            Self::Right(store) => store.is_available(),
        }
    }
}

pin_project! {
    /// The future of an [`EitherStore`] check.
    #[project = EitherFutureProj]
    #[derive(Debug)]
    #[allow(missing_docs)] // the fields: each variant's future
    pub enum EitherFuture<A, B> {
        /// The first store's.
        Left { #[pin] future: A },
        /// The second store's.
        Right { #[pin] future: B },
    }
}

impl<A, B> Future for EitherFuture<A, B>
where
    A: Future<Output = Result<Decisions, StoreError>>,
    B: Future<Output = Result<Decisions, StoreError>>,
{
    type Output = Result<Decisions, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            EitherFutureProj::Left { future } => future.poll(cx),
            EitherFutureProj::Right { future } => future.poll(cx),
        }
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;
    use crate::rate_limit::{Key, MemoryStore, PolicyName, Quota};

    fn check() -> Check {
        Check {
            policy: PolicyName::from("p"),
            key: Key::from("k"),
            quota: Quota::per_minute(1),
            cost: 1,
            enforce: true,
        }
    }

    #[tokio::test]
    async fn decides_with_the_chosen_store() {
        let left: EitherStore<MemoryStore, MemoryStore> = EitherStore::Left(MemoryStore::new());
        assert!(left.check(&[check()]).await.unwrap().allowed);
        assert!(!left.check(&[check()]).await.unwrap().allowed);
        let right: EitherStore<MemoryStore, MemoryStore> = EitherStore::Right(MemoryStore::new());
        assert!(right.check(&[check()]).await.unwrap().allowed);
        assert!(left.is_available() && right.is_available());
    }
}
