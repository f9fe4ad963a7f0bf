//! [`Quota`]: N per period with a burst.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use super::gcra::Gcra;

/// How much a key may do: `count` requests per `period`, with bursts of up
/// to `burst` requests at once (GCRA, the semantics of the `governor` crate).
///
/// With the default burst (equal to `count`) a fresh key may spend its whole
/// quota at once, and then gets one more request every `period / count`.
///
/// Parses from `N/PERIOD[,burst=B]`, where PERIOD is `s`, `min`, `h` or a
/// duration such as `10s`, `500ms`, `2min` (for example `100/min,burst=20`).
///
/// ```
/// use std::time::Duration;
/// use tollgate::rate_limit::Quota;
///
/// let q: Quota = "100/min,burst=20".parse().unwrap();
/// assert_eq!(q, Quota::per_minute(100).with_burst(20));
/// assert_eq!(q.replenish_interval(), Duration::from_millis(600));
/// assert_eq!(q.to_string(), "100/60s,burst=20");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    count: NonZeroU32,
    period: Duration,
    burst: NonZeroU32,
    /// Derived from the three above once, not on every check.
    gcra: Gcra,
}

impl Quota {
    /// `count` requests per `period`, burst `count`.
    ///
    /// # Panics
    ///
    /// If `count` is zero or `period` is zero.
    pub fn new(count: u32, period: Duration) -> Self {
        let count = NonZeroU32::new(count).expect("a quota needs a count above zero");
        assert!(!period.is_zero(), "a quota needs a period above zero");
        Self {
            count,
            period,
            burst: count,
            gcra: Gcra::new(period / count.get(), count.get()),
        }
    }

    /// `count` per second.
    pub fn per_second(count: u32) -> Self {
        Self::new(count, Duration::from_secs(1))
    }

    /// `count` per minute.
    pub fn per_minute(count: u32) -> Self {
        Self::new(count, Duration::from_secs(60))
    }

    /// `count` per hour.
    pub fn per_hour(count: u32) -> Self {
        Self::new(count, Duration::from_secs(3600))
    }

    /// Allows bursts of `burst` requests at once.
    ///
    /// # Panics
    ///
    /// If `burst` is zero.
    #[must_use]
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = NonZeroU32::new(burst).expect("a burst needs to be above zero");
        self.gcra = Gcra::new(self.replenish_interval(), burst);
        self
    }

    /// This quota shared among `n` replicas deciding alone: count and burst
    /// divided by `n`, at least 1 each. Used by the local fallback.
    #[must_use]
    pub fn divided_by(self, n: u32) -> Self {
        if n <= 1 {
            return self;
        }
        let count = (self.count.get() / n).max(1);
        let burst = (self.burst.get() / n).max(1);
        Self::new(count, self.period).with_burst(burst)
    }

    /// Requests per period.
    pub fn count(&self) -> u32 {
        self.count.get()
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The most requests (or cost units) allowed at once.
    pub fn burst(&self) -> u32 {
        self.burst.get()
    }

    /// The time it takes to earn back one unit: `period / count`.
    pub fn replenish_interval(&self) -> Duration {
        self.period / self.count.get()
    }

    /// The time an exhausted key takes to earn back its whole burst; the
    /// `w` this quota advertises in `RateLimit-Policy`.
    ///
    /// Saturates at `Duration::MAX` for a quota built by hand with an
    /// absurd period; parsing refuses such quotas.
    pub fn window(&self) -> Duration {
        self.replenish_interval()
            .checked_mul(self.burst.get())
            .unwrap_or(Duration::MAX)
    }

    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(crate) fn gcra(&self) -> Gcra {
        self.gcra
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:?}", self.count, self.period)?;
        if self.burst != self.count {
            write!(f, ",burst={}", self.burst)?;
        }
        Ok(())
    }
}

/// The format a quota string must follow, for error messages.
pub const QUOTA_FORMAT: &str = "N/PERIOD[,burst=B], PERIOD one of s, min, h or a duration like 10s, 500ms, 2min (e.g. 100/min,burst=20)";

/// A quota string did not follow [`QUOTA_FORMAT`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quota `{input}`: {reason} (expected {QUOTA_FORMAT})")]
pub struct ParseQuotaError {
    input: String,
    reason: &'static str,
}

impl FromStr for Quota {
    type Err = ParseQuotaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseQuotaError {
            input: s.to_owned(),
            reason,
        };
        let mut parts = s.split(',').map(str::trim);
        let rate = parts.next().unwrap_or_default();
        let (count, period) = rate.split_once('/').ok_or_else(|| err("missing `/`"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| err("N is not a whole number"))?;
        if count == 0 {
            return Err(err("N must be above zero"));
        }
        let period = parse_period(period.trim()).ok_or_else(|| err("unknown PERIOD"))?;
        let mut quota = Quota::new(count, period);
        for option in parts {
            let (k, v) = option
                .split_once('=')
                .ok_or_else(|| err("options are key=value"))?;
            match k.trim() {
                "burst" => {
                    let burst: u32 = v
                        .trim()
                        .parse()
                        .map_err(|_| err("burst is not a whole number"))?;
                    if burst == 0 {
                        return Err(err("burst must be above zero"));
                    }
                    quota = quota.with_burst(burst);
                }
                _ => return Err(err("the only option is burst")),
            }
        }
        // The window is counted in nanoseconds (u64): about 584 years.
        let window_fits = quota
            .replenish_interval()
            .checked_mul(quota.burst())
            .is_some_and(|w| w.as_nanos() <= u128::from(u64::MAX));
        if !window_fits {
            return Err(err(
                "PERIOD / N × burst is too long (at most about 584 years)",
            ));
        }
        Ok(quota)
    }
}

/// `s`, `min`, `h`, or a number followed by `ms`, `s`, `m`, `min`, `h`.
fn parse_period(s: &str) -> Option<Duration> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = if n.is_empty() { 1 } else { n.parse().ok()? };
    let period = match unit {
        "ms" => Duration::from_millis(n),
        "s" | "sec" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (!period.is_zero()).then_some(period)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!("100/min".parse(), Ok(Quota::per_minute(100)));
        assert_eq!("5/s".parse(), Ok(Quota::per_second(5)));
        assert_eq!("1000/h".parse(), Ok(Quota::per_hour(1000)));
        assert_eq!(
            "10/10s, burst=3".parse(),
            Ok(Quota::new(10, Duration::from_secs(10)).with_burst(3))
        );
        assert_eq!(
            "3/500ms".parse(),
            Ok(Quota::new(3, Duration::from_millis(500)))
        );
        assert_eq!(
            "3/2min".parse(),
            Ok(Quota::new(3, Duration::from_secs(120)))
        );
    }

    #[test]
    fn rejects_with_the_format() {
        for bad in [
            "",
            "abc",
            "0/s",
            "10",
            "10/fortnight",
            "10/0s",
            "-1/s",
            "10/s,burst=0",
            "10/s,burst=x",
            "10/s,foo=1",
            "10/s,burst",
        ] {
            let err = bad.parse::<Quota>().unwrap_err().to_string();
            assert!(err.contains(QUOTA_FORMAT), "{bad}: {err}");
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
    }

    #[test]
    fn divided_among_replicas() {
        let q = Quota::per_minute(100).with_burst(30);
        assert_eq!(q.divided_by(3), Quota::per_minute(33).with_burst(10));
        assert_eq!(q.divided_by(1), q);
        assert_eq!(q.divided_by(0), q);
        assert_eq!(Quota::per_second(2).divided_by(5), Quota::per_second(1));
    }

    #[test]
    fn window_and_interval() {
        let q = Quota::per_minute(100);
        assert_eq!(q.window(), Duration::from_secs(60));
        let q = q.with_burst(20);
        assert_eq!(q.window(), Duration::from_secs(12));
    }

    #[test]
    fn a_window_too_long_to_count_is_refused_not_a_panic() {
        let err = "1/5000000000000000h,burst=2".parse::<Quota>().unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
        assert!("1/1000h,burst=1000".parse::<Quota>().is_ok());
        // Built by hand, it saturates instead of panicking.
        let q = Quota::new(1, Duration::from_secs(u64::MAX / 2)).with_burst(4);
        assert_eq!(q.window(), Duration::MAX);
    }
}
