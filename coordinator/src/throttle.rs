//! Request limits of the HTTP API, so that no one client, anonymous or
//! signed, can take the service away from the others.
//!
//! | who | limit | default | changed by |
//! |---|---|---|---|
//! | unauthenticated requests (no `Authorization`), per source address (an IPv4 address, an IPv6 /64) | a token bucket | 20/s, bursts of 40 | `--public-rate`, `--public-burst` |
//! | unauthenticated requests being served at once, from everyone | a budget of their own, apart from signed requests (which never wait for it) | 8 | `--public-in-flight` |
//! | requests whose signature is refused, per source address | past it, that address's signed requests are refused before their signature is checked | the public rate | (with `--public-rate`) |
//! | signed requests per buyer key, counted once the signature verified and before the body is read | a token bucket | 200/s, bursts of 1,000 | `--buyer-rate`, `--buyer-burst` |
//! | addresses and keys remembered (an idle one is forgotten once its bucket is full again) | per table | 65,536 | [`ApiLimits::tracked`] |
//! | a refusal is answered after its `Retry-After` (a client that does not wait is slowed to one request per connection per delay) | at most, for this many refusals at once (more are answered at once) | 1 s, 16,384 | `--refusal-delay`, [`ApiLimits::held`] |
//!
//! Every refusal is a [`Throttled`]: HTTP 429 with `Retry-After` (whole
//! seconds) and an `{"error": …}` that names the limit and when to retry
//! (`crate::auth::ApiError::Throttled`, the one status mapping).
//!
//! Why refusals are held: a 429 costs little, but a client that ignores
//! `Retry-After` and sends again at once, from many connections, makes the
//! coordinator parse and refuse tens of thousands of requests a second,
//! and the CPU that takes is the honest buyers'. Held for the delay it was
//! told, each of its connections costs one timer instead.
//!
//! The buckets are GCRA (one "theoretical arrival time" per key): a key is
//! refused while its time is more than `(burst - 1)` intervals ahead of
//! now, and a key whose time is in the past holds a full bucket, carries no
//! information and is swept. Behind a reverse proxy every request has the
//! proxy's address: raise `--public-rate` there, or put the limit in the
//! proxy.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kiln_protocol::BuyerId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A request refused by a limit: why (naming the limit and when to
/// retry), and after how many seconds to retry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Throttled {
    pub reason: String,
    pub retry_after: u64,
}

/// A sustained rate and the burst allowed above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// The API's request limits (`None`: no limit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiLimits {
    /// Unauthenticated requests from one source address.
    pub public_rate: Option<Rate>,
    /// Unauthenticated requests served at once, from everyone.
    pub public_in_flight: Option<usize>,
    /// Signed requests from one buyer key.
    pub buyer_rate: Option<Rate>,
    /// Most addresses (and, apart, keys) remembered at once; when every
    /// one is busy, a new one is refused until some go idle.
    pub tracked: usize,
    /// How long a refusal is held before it is answered (its
    /// `Retry-After`, at most this); `None`: answered at once.
    pub refusal_delay: Option<Duration>,
    /// Most refusals held at once; more are answered at once.
    pub held: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            public_rate: Some(Rate {
                per_second: 20,
                burst: 40,
            }),
            public_in_flight: Some(8),
            buyer_rate: Some(Rate {
                per_second: 200,
                burst: 1000,
            }),
            tracked: 65_536,
            refusal_delay: Some(Duration::from_secs(1)),
            held: 16_384,
        }
    }
}

impl ApiLimits {
    /// No limit at all (benchmarks of the bare routes).
    pub fn off() -> Self {
        Self {
            public_rate: None,
            public_in_flight: None,
            buyer_rate: None,
            refusal_delay: None,
            ..Self::default()
        }
    }
}

/// Why a key was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over its rate: retry after this long.
    Rate(Duration),
    /// A new key while the table is full of busy ones.
    Full,
}

/// GCRA timing, in nanoseconds since the limiter's epoch.
#[derive(Clone, Copy, Debug)]
struct Gcra {
    interval: u64,
    tolerance: u64,
}

impl Gcra {
    fn of(rate: Rate) -> Self {
        let interval = 1_000_000_000 / u64::from(rate.per_second.max(1));
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(rate.burst.max(1) - 1)),
        }
    }
}

struct Table<K> {
    tat: HashMap<K, u64>,
    next_sweep: u64,
}

/// A rate per key, with a bounded table of keys.
pub struct Limiter<K> {
    gcra: Option<Gcra>,
    capacity: usize,
    epoch: Instant,
    table: Mutex<Table<K>>,
}

/// Sweeps of idle keys happen at most this often (a pass over the table).
const SWEEP_EVERY_NS: u64 = 1_000_000_000;

impl<K: Hash + Eq + Copy> Limiter<K> {
    pub fn new(rate: Option<Rate>, capacity: usize) -> Self {
        Self {
            gcra: rate.map(Gcra::of),
            capacity: capacity.max(1),
            epoch: Instant::now(),
            table: Mutex::new(Table {
                tat: HashMap::new(),
                next_sweep: 0,
            }),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<K>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one request of `key`.
    pub fn take(&self, key: K) -> Result<(), Refusal> {
        if self.gcra.is_none() {
            return Ok(());
        }
        // The clock is read under the lock, so times only move forward.
        let mut t = self.lock();
        let now = self.now();
        self.take_locked(&mut t, key, now)
    }

    /// Whether `key` is over its rate now, without counting anything.
    pub fn is_over(&self, key: K) -> Option<Duration> {
        let g = self.gcra?;
        let t = self.lock();
        let tat = *t.tat.get(&key)?;
        wait(g, tat, self.now())
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.lock().tat.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[cfg(test)]
    fn take_at(&self, key: K, now: u64) -> Result<(), Refusal> {
        let mut t = self.lock();
        self.take_locked(&mut t, key, now)
    }

    fn take_locked(&self, t: &mut Table<K>, key: K, now: u64) -> Result<(), Refusal> {
        let Some(g) = self.gcra else { return Ok(()) };
        if now >= t.next_sweep || (t.tat.len() >= self.capacity && !t.tat.contains_key(&key)) {
            // A key whose time has passed holds a full bucket: forgetting
            // it changes nothing. When full, sweep at most every 1/10 s.
            t.tat.retain(|_, tat| *tat > now);
            let every = if t.tat.len() >= self.capacity {
                SWEEP_EVERY_NS / 10
            } else {
                SWEEP_EVERY_NS
            };
            t.next_sweep = now.saturating_add(every);
        }
        let known = t.tat.get(&key).copied();
        if known.is_none() && t.tat.len() >= self.capacity {
            return Err(Refusal::Full);
        }
        let tat = known.unwrap_or(now).max(now);
        if let Some(w) = wait(g, tat, now) {
            return Err(Refusal::Rate(w));
        }
        t.tat.insert(key, tat.saturating_add(g.interval));
        Ok(())
    }
}

/// How long until a request of a key at `tat` would conform, if it does
/// not now.
fn wait(g: Gcra, tat: u64, now: u64) -> Option<Duration> {
    let ahead = tat.saturating_sub(now);
    (ahead > g.tolerance).then(|| Duration::from_nanos(ahead - g.tolerance))
}

/// What a source address is counted as: itself (IPv4, an IPv4-mapped IPv6
/// address as IPv4), or its /64 for IPv6, which one host usually holds whole.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// A number in `[0, 1)` that differs from call to call (the clock's
/// nanoseconds, mixed): enough to spread timers, not a secret.
fn spread() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mixed = u64::from(nanos).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    mixed as f64 / (1u64 << 53) as f64
}

/// Whole seconds for `Retry-After` (at least 1).
fn retry_secs(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Every limit the API applies, shared by all requests.
pub struct Throttle {
    limits: ApiLimits,
    public: Limiter<IpAddr>,
    bad_auth: Limiter<IpAddr>,
    buyers: Limiter<[u8; 32]>,
    in_flight: Option<Arc<Semaphore>>,
    /// Places to hold a refusal (see the module doc).
    held: Semaphore,
}

/// What a request that got no source address is counted as (an app
/// served without `ConnectInfo`, e.g. in a unit test).
const UNKNOWN_SOURCE: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

impl Throttle {
    pub fn new(limits: &ApiLimits) -> Self {
        Self {
            public: Limiter::new(limits.public_rate, limits.tracked),
            bad_auth: Limiter::new(limits.public_rate, limits.tracked),
            buyers: Limiter::new(limits.buyer_rate, limits.tracked),
            in_flight: limits
                .public_in_flight
                .map(|n| Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS)))),
            held: Semaphore::new(limits.held.min(Semaphore::MAX_PERMITS)),
            limits: limits.clone(),
        }
    }

    pub fn limits(&self) -> &ApiLimits {
        &self.limits
    }

    /// Waits before a refusal is answered: its `Retry-After`, at most
    /// `refusal_delay`, less up to half of it at random, if a place to
    /// hold it is free. (Without the spread, connections refused together
    /// would come back together, in waves.)
    pub async fn hold(&self, t: &Throttled) {
        let Some(max) = self.limits.refusal_delay else {
            return;
        };
        let Ok(_place) = self.held.try_acquire() else {
            return;
        };
        let delay = Duration::from_secs(t.retry_after).min(max);
        tokio::time::sleep(delay.mul_f64(1.0 - spread() / 2.0)).await;
    }

    /// Admits an unauthenticated request from `source`: its address's
    /// rate, then a place in the unauthenticated budget, held by the
    /// returned permit until the response is built.
    pub fn admit_public(
        &self,
        source: Option<IpAddr>,
    ) -> Result<Option<OwnedSemaphorePermit>, Throttled> {
        let ip = source.map_or(UNKNOWN_SOURCE, source_key);
        match self.public.take(ip) {
            Ok(()) => {}
            Err(Refusal::Rate(w)) => {
                let r = self.limits.public_rate.unwrap_or(Rate {
                    per_second: 0,
                    burst: 0,
                });
                return Err(Throttled {
                    reason: format!(
                        "too many unauthenticated requests from {ip}: at most {}/s (bursts of {}) per address; retry in {} s, or sign requests with a buyer key (the kiln CLI does) to be counted by key instead",
                        r.per_second,
                        r.burst,
                        retry_secs(w)
                    ),
                    retry_after: retry_secs(w),
                });
            }
            Err(Refusal::Full) => return Err(busy_table("addresses")),
        }
        let Some(sem) = &self.in_flight else {
            return Ok(None);
        };
        match sem.clone().try_acquire_owned() {
            Ok(p) => Ok(Some(p)),
            Err(_) => Err(Throttled {
                reason: format!(
                    "the coordinator is serving as many unauthenticated requests as it allows at once ({}); retry in 1 s (signed requests have their own budget)",
                    self.limits.public_in_flight.unwrap_or_default()
                ),
                retry_after: 1,
            }),
        }
    }

    /// Refuses a signed request from `source` unread while that address
    /// is over its rate of refused signatures.
    pub fn check_signer(&self, source: Option<IpAddr>) -> Result<(), Throttled> {
        let ip = source.map_or(UNKNOWN_SOURCE, source_key);
        match self.bad_auth.is_over(ip) {
            None => Ok(()),
            Some(w) => Err(Throttled {
                reason: format!(
                    "too many requests with a refused signature from {ip}; its signed requests are not checked for {} s: fix the signing (kiln signs every request anew) and retry then",
                    retry_secs(w)
                ),
                retry_after: retry_secs(w),
            }),
        }
    }

    /// Counts a refused signature against `source`.
    pub fn note_refused_signature(&self, source: Option<IpAddr>) {
        let _ = self
            .bad_auth
            .take(source.map_or(UNKNOWN_SOURCE, source_key));
    }

    /// Counts a signed request of `buyer` (its signature verified).
    pub fn admit_buyer(&self, buyer: &BuyerId) -> Result<(), Throttled> {
        match self.buyers.take(*buyer.as_bytes()) {
            Ok(()) => Ok(()),
            Err(Refusal::Rate(w)) => {
                let r = self.limits.buyer_rate.unwrap_or(Rate {
                    per_second: 0,
                    burst: 0,
                });
                Err(Throttled {
                    reason: format!(
                        "too many requests from buyer {}: at most {}/s (bursts of {}) per key; retry in {} s",
                        buyer.short(),
                        r.per_second,
                        r.burst,
                        retry_secs(w)
                    ),
                    retry_after: retry_secs(w),
                })
            }
            Err(Refusal::Full) => Err(busy_table("buyer keys")),
        }
    }
}

fn busy_table(what: &str) -> Throttled {
    Throttled {
        reason: format!(
            "the coordinator is rate-limiting as many {what} as it tracks at once; retry in 1 s"
        ),
        retry_after: 1,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate { per_second, burst })
    }

    #[test]
    fn a_key_gets_its_burst_then_its_rate() {
        let (r, b) = (10u32, 4u32);
        let l: Limiter<u8> = Limiter::new(rate(r, b), 16);
        let t0 = 5 * SEC;
        for _ in 0..b {
            l.take_at(1, t0).unwrap();
        }
        let Err(Refusal::Rate(w)) = l.take_at(1, t0) else {
            panic!("past the burst")
        };
        // The next token comes one interval later.
        assert_eq!(w, Duration::from_nanos(SEC / u64::from(r)));
        // Another key is untouched.
        l.take_at(2, t0).unwrap();
        // After one interval, one more; not two.
        let t1 = t0 + SEC / u64::from(r);
        l.take_at(1, t1).unwrap();
        assert!(l.take_at(1, t1).is_err());
        // After a long pause the burst is whole again.
        let t2 = t1 + 10 * SEC;
        for _ in 0..b {
            l.take_at(1, t2).unwrap();
        }
        assert!(l.take_at(1, t2).is_err());
    }

    #[test]
    fn the_table_is_bounded_and_idle_keys_are_forgotten() {
        let cap = 3;
        let l: Limiter<u32> = Limiter::new(rate(1, 2), cap);
        let t0 = 5 * SEC;
        for k in 0..cap as u32 {
            l.take_at(k, t0).unwrap();
        }
        // Every remembered key is busy: a new one waits.
        assert_eq!(l.take_at(99, t0), Err(Refusal::Full));
        // A known key still gets its own rate.
        l.take_at(0, t0).unwrap();
        // Once their buckets are full again they are swept.
        l.take_at(99, t0 + 3 * SEC).unwrap();
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn no_rate_means_no_limit_and_nothing_remembered() {
        let l: Limiter<u8> = Limiter::new(None, 1);
        for _ in 0..10_000 {
            l.take(1).unwrap();
        }
        assert!(l.is_empty());
    }

    #[test]
    fn ipv6_is_counted_by_its_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let m: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_key(m), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_spread_is_a_fraction() {
        for _ in 0..1000 {
            let x = spread();
            assert!((0.0..1.0).contains(&x), "{x}");
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(retry_secs(Duration::ZERO), 1);
        assert_eq!(retry_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_secs(Duration::from_millis(1001)), 2);
    }

    #[tokio::test]
    async fn the_unauthenticated_budget_is_apart_from_the_rate() {
        let limits = ApiLimits {
            public_rate: rate(1000, 1000),
            public_in_flight: Some(2),
            ..ApiLimits::default()
        };
        let t = Throttle::new(&limits);
        let ip = Some("192.0.2.1".parse().unwrap());
        let a = t.admit_public(ip).unwrap();
        let _b = t.admit_public(ip).unwrap();
        let e = t.admit_public(ip).unwrap_err();
        assert!(e.to_string().contains("at once (2)"), "{e}");
        drop(a);
        t.admit_public(ip).unwrap();
        // Signed requests never touch it.
        let buyer = BuyerId::new(kiln_protocol::Keypair::generate().public());
        t.admit_buyer(&buyer).unwrap();
    }
}
