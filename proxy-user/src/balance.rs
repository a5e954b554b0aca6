//! Per-request balancing over a service's endpoints, the way linkerd2-proxy does it:
//! power of two choices over peak-EWMA latency weighted by pending requests, with failures
//! penalised and endpoints that keep failing ejected for a while. Traffic shifting sits in
//! front: the endpoints of a service are grouped in subsets (say, task definition
//! revisions), a subset's weight decides how many requests it gets, and P2C picks within
//! it.
//!
//! Everything here is plain logic over `Instant`s handed in by the caller, so the unit
//! tests need no clock, no socket and no root.
mod budget;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

pub use budget::{Budget, BudgetSettings};

use crate::discovery::Endpoint;

/// How fast an estimate forgets (linkerd2-proxy's default decay).
pub const DECAY: Duration = Duration::from_secs(10);
/// What an endpoint never measured is assumed to take.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// A failure counts as this much latency (at least): a fast 503 must not look best.
pub const FAILURE_PENALTY: Duration = Duration::from_millis(500);
/// Consecutive failures that eject an endpoint.
pub const EJECT_AFTER: u32 = 5;
/// First ejection; each ejection in a row doubles it, up to `MAX_EJECTION`.
pub const BASE_EJECTION: Duration = Duration::from_secs(1);
pub const MAX_EJECTION: Duration = Duration::from_secs(30);

/// Backoff before retry `n` (1 for the first): 25 ms × 2^(n−1), at most 250 ms, times a
/// random 0.5–1 so that clients failing together do not retry together.
pub fn backoff(n: u32, rng: &mut fastrand::Rng) -> Duration {
    Duration::from_millis(25)
        .saturating_mul(1 << n.saturating_sub(1).min(4))
        .min(Duration::from_millis(250))
        .mul_f64(0.5 + rng.f64() / 2.0)
}

/// What the balancer knows about one endpoint.
#[derive(Debug, Clone)]
pub struct EndpointState {
    /// Peak-EWMA latency estimate, nanoseconds, as of `stamp`.
    rtt_ns: f64,
    stamp: Instant,
    pending: u32,
    consecutive_failures: u32,
    /// Ejections in a row (the backoff exponent); reset by a success after re-admission.
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl EndpointState {
    fn new(now: Instant) -> Self {
        Self {
            rtt_ns: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
            pending: 0,
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
        }
    }

    /// The estimate decayed to `now` (an endpoint not heard from drifts back to being
    /// tried, as in tower's PeakEwma).
    fn decayed(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.rtt_ns * (-elapsed / DECAY.as_secs_f64()).exp()
    }

    /// Load: latency estimate times (pending + 1).
    pub fn cost(&self, now: Instant) -> f64 {
        self.decayed(now) * f64::from(self.pending + 1)
    }

    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let current = self.decayed(now);
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.rtt_ns = if rtt > current {
            // Peak: a slower response is believed at once.
            rtt
        } else {
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            current * w + rtt * (1.0 - w)
        };
        self.stamp = now;
    }

    pub fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }

    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// What `/endpoints` shows: the load estimate, pending requests, ejection.
    pub fn report(&self, now: Instant) -> serde_json::Value {
        serde_json::json!({
            "ewma_ms": self.decayed(now) / 1e6,
            "pending": self.pending,
            "consecutive_failures": self.consecutive_failures,
            "ejected_for_ms": self
                .ejected_until
                .map_or(0, |t| t.saturating_duration_since(now).as_millis() as u64),
            "ejections_in_a_row": self.ejections,
        })
    }
}

/// How one request to an endpoint ended, for the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response the balancer counts as good, after this long.
    Success(Duration),
    /// Refused, timed out, reset, a retryable status, or the destination's health gate.
    Failure(Duration),
}

/// The balancing state of every service this proxy sent requests to.
#[derive(Default)]
pub struct Balancer {
    services: Mutex<HashMap<String, Arc<ServiceState>>>,
}

/// One service: its endpoints' state and its retry budget.
pub struct ServiceState {
    endpoints: Mutex<HashMap<SocketAddr, EndpointState>>,
    pub budget: Budget,
}

impl Balancer {
    /// The state of `service`, created with `budget` the first time it is asked for.
    pub fn service(&self, service: &str, budget: BudgetSettings) -> Arc<ServiceState> {
        let mut all = self.services.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = all.get(service) {
            return s.clone();
        }
        all.entry(service.to_owned())
            .or_insert_with(|| {
                Arc::new(ServiceState {
                    endpoints: Mutex::default(),
                    budget: Budget::new(budget),
                })
            })
            .clone()
    }
}

impl Balancer {
    /// The state of `service` if it has carried requests (`/endpoints`).
    pub fn existing(&self, service: &str) -> Option<Arc<ServiceState>> {
        let all = self.services.lock().unwrap_or_else(|e| e.into_inner());
        all.get(service).cloned()
    }
}

/// A request in flight to an endpoint; its outcome feeds the estimate. Dropped without
/// `finish` (the client went away), it only stops counting as pending.
pub struct InFlight {
    service: Arc<ServiceState>,
    addr: SocketAddr,
    started: Instant,
    done: bool,
}

impl InFlight {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn finish(mut self, outcome: Outcome, now: Instant) {
        self.done = true;
        let mut eps = self.service.lock();
        let st = eps
            .entry(self.addr)
            .or_insert_with(|| EndpointState::new(now));
        st.pending = st.pending.saturating_sub(1);
        match outcome {
            Outcome::Success(rtt) => {
                st.observe(rtt, now);
                st.consecutive_failures = 0;
                if !st.ejected(now) {
                    st.ejections = 0;
                }
            }
            Outcome::Failure(rtt) => {
                st.observe(rtt.max(FAILURE_PENALTY), now);
                st.consecutive_failures += 1;
                if st.consecutive_failures >= EJECT_AFTER {
                    let backoff = BASE_EJECTION
                        .saturating_mul(1u32 << st.ejections.min(16))
                        .min(MAX_EJECTION);
                    st.ejected_until = Some(now + backoff);
                    st.ejections += 1;
                    st.consecutive_failures = 0;
                    tracing::info!(endpoint = %self.addr, ?backoff, "endpoint ejected after consecutive failures");
                }
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            let mut eps = self.service.lock();
            if let Some(st) = eps.get_mut(&self.addr) {
                st.pending = st.pending.saturating_sub(1);
            }
        }
    }
}

impl ServiceState {
    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, EndpointState>> {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state of one endpoint (tests, `/endpoints`).
    pub fn state(&self, addr: SocketAddr) -> Option<EndpointState> {
        self.lock().get(&addr).cloned()
    }

    /// Picks an endpoint of `endpoints` (the service's current ones) for one attempt and
    /// counts it as pending. A subset is drawn by weight (weight 0: no new requests), then
    /// P2C by cost among its endpoints that are not ejected and not in `tried`, falling
    /// back to tried ones, then to ejected ones, rather than to nothing. `None`: no
    /// endpoint, or every subset has weight 0.
    pub fn pick(
        self: &Arc<Self>,
        endpoints: &[Endpoint],
        tried: &[SocketAddr],
        now: Instant,
        rng: &mut fastrand::Rng,
    ) -> Option<InFlight> {
        let subset = pick_subset(endpoints, rng)?;
        let members: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| e.subset.as_deref() == subset)
            .collect();
        let mut eps = self.lock();
        for e in &members {
            eps.entry(e.addr).or_insert_with(|| EndpointState::new(now));
        }
        let ok = |e: &&&Endpoint| !eps[&e.addr].ejected(now);
        let fresh = |e: &&&Endpoint| !tried.contains(&e.addr);
        let tiers: [Vec<&&Endpoint>; 3] = [
            members.iter().filter(ok).filter(fresh).collect(),
            members.iter().filter(ok).collect(),
            members.iter().collect(),
        ];
        let pool = tiers.into_iter().find(|t| !t.is_empty())?;
        let chosen = match pool.len() {
            1 => pool[0].addr,
            n => {
                let a = rng.usize(..n);
                let mut b = rng.usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (pool[a].addr, pool[b].addr);
                if eps[&b].cost(now) < eps[&a].cost(now) {
                    b
                } else {
                    a
                }
            }
        };
        if let Some(st) = eps.get_mut(&chosen) {
            st.pending += 1;
        }
        drop(eps);
        Some(InFlight {
            service: self.clone(),
            addr: chosen,
            started: now,
            done: false,
        })
    }
}

/// Draws a subset by weight: a subset weighs what its heaviest endpoint says (both
/// sources put the weight on endpoints; they agree within a subset in practice, and the
/// heaviest wins if not). `Some(None)` is the subset of endpoints without one.
fn pick_subset<'a>(endpoints: &'a [Endpoint], rng: &mut fastrand::Rng) -> Option<Option<&'a str>> {
    let mut weights: BTreeMap<Option<&str>, u64> = BTreeMap::new();
    for e in endpoints {
        let w = weights.entry(e.subset.as_deref()).or_default();
        *w = (*w).max(u64::from(e.weight));
    }
    let total: u64 = weights.values().sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rng.u64(..total);
    for (subset, w) in weights {
        if ticket < w {
            return Some(subset);
        }
        ticket -= w;
    }
    None
}

#[cfg(test)]
mod tests;
