//! Bounded cardinality. Series labelled by tasks (workloads, SPIFFE IDs, endpoints) grow
//! with every task a node ever saw; here they are tracked so that
//! - the label sets of tasks that stopped are removed after a grace period (`Janitor`:
//!   a name is gone once it left the node's tasks or discovery and stayed away), and
//! - each metric holds at most `max_series_per_metric` label sets: beyond that, new label
//!   sets are folded into one whose task names read `overflow`, counted by
//!   `ecsmesh_metric_series_overflow_total{metric}` — totals stay right, nothing is lost.
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::{EndpointLabels, HandshakeLabels, StreamLabels};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{MetricType, TypedMetric, counter::Counter, family::Family},
};

/// The label value that replaces task names in the overflow series.
pub const OVERFLOW: &str = "overflow";

/// A label set that names tasks.
pub trait TaskNames: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync {
    /// Every label value that names a task: a workload (family), a SPIFFE ID, an endpoint.
    fn task_names(&self) -> Vec<&str>;
    /// The same label set with every task name replaced by [`OVERFLOW`].
    fn overflowed(&self) -> Self;
}

/// The label of `ecsmesh_metric_series_overflow_total` and `ecsmesh_metric_series`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct MetricLabels {
    pub metric: &'static str,
}

/// A metric family whose label sets are tracked (for removal) and capped.
pub struct Bounded<L, M, C = fn() -> M> {
    name: &'static str,
    family: Family<L, M, C>,
    /// Every label set in `family`. Series are created and removed only while holding it,
    /// so the two never disagree.
    keys: Arc<Mutex<HashSet<L>>>,
    cap: Arc<AtomicUsize>,
    overflow: Counter,
}

impl<L, M, C> Bounded<L, M, C>
where
    L: TaskNames,
    M: TypedMetric,
    C: prometheus_client::metrics::family::MetricConstructor<M> + Clone,
{
    pub fn new(
        name: &'static str,
        family: Family<L, M, C>,
        cap: &Arc<AtomicUsize>,
        overflow: &Family<MetricLabels, Counter>,
    ) -> Self {
        Self {
            name,
            family,
            keys: Arc::default(),
            cap: cap.clone(),
            overflow: overflow
                .get_or_create(&MetricLabels { metric: name })
                .clone(),
        }
    }

    /// What to register.
    pub fn family(&self) -> Family<L, M, C> {
        self.family.clone()
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The series for `labels` — or, once the metric is at its cap, the overflow series.
    pub fn get_or_create(&self, labels: &L) -> impl std::ops::Deref<Target = M> + '_ {
        if let Some(m) = self.family.get(labels) {
            return m;
        }
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let key = if keys.contains(labels) || keys.len() < self.cap.load(Ordering::Relaxed) {
            labels.clone()
        } else {
            self.overflow.inc();
            labels.overflowed()
        };
        keys.insert(key.clone());
        // Created under the lock (a sweep cannot remove it in between); the guard outlives
        // the lock, which a sweep only takes before the family's.
        self.family.get_or_create(&key)
    }
}

/// What a sweep needs of a bounded family, whatever its label and metric types.
pub trait Sweep: Send + Sync {
    fn name(&self) -> &'static str;
    /// Removes every series one of whose task names `gone` matches; returns how many.
    fn remove_mentioning(&self, gone: &dyn Fn(&str) -> bool) -> usize;
    fn series_count(&self) -> usize;
}

impl<L, M, C> Sweep for Bounded<L, M, C>
where
    L: TaskNames,
    M: TypedMetric + Send + Sync,
    C: prometheus_client::metrics::family::MetricConstructor<M> + Clone + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn remove_mentioning(&self, gone: &dyn Fn(&str) -> bool) -> usize {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let before = keys.len();
        keys.retain(|k| {
            let dead = k.task_names().into_iter().any(gone);
            if dead {
                self.family.remove(k);
            }
            !dead
        });
        before - keys.len()
    }

    fn series_count(&self) -> usize {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl<L, M, C> TypedMetric for Bounded<L, M, C>
where
    M: TypedMetric,
{
    const TYPE: MetricType = M::TYPE;
}

/// How long a gone name is still removed after its grace period: a connection of a
/// stopped task that closes late re-creates its series, and the next sweep takes it.
const KEEP_REMOVING: Duration = Duration::from_secs(3600);

/// Decides which task names are gone: pure logic over the names live at each sweep
/// (local tasks and discovery) and the tasks that left since the last one.
#[derive(Debug)]
pub struct Janitor {
    grace: Duration,
    previous: HashSet<String>,
    /// Name → when it was first seen gone.
    gone: HashMap<String, Instant>,
}

impl Janitor {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            previous: HashSet::new(),
            gone: HashMap::new(),
        }
    }

    /// The names whose series are to be removed now: gone for at least the grace period.
    pub fn sweep(
        &mut self,
        now: Instant,
        live: HashSet<String>,
        departed: impl IntoIterator<Item = String>,
    ) -> HashSet<String> {
        let left = self.previous.difference(&live).cloned();
        for name in left.chain(departed) {
            if !live.contains(&name) {
                self.gone.entry(name).or_insert(now);
            }
        }
        let grace = self.grace;
        self.gone
            .retain(|name, since| !live.contains(name) && now < *since + grace + KEEP_REMOVING);
        self.previous = live;
        self.gone
            .iter()
            .filter(|(_, since)| now >= **since + grace)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

// The proxy's own task-labelled label sets (Istio's are in `istio.rs`).

impl TaskNames for HandshakeLabels {
    fn task_names(&self) -> Vec<&str> {
        vec![&self.source_identity, &self.destination_identity]
    }

    fn overflowed(&self) -> Self {
        Self {
            role: self.role,
            source_identity: OVERFLOW.into(),
            destination_identity: OVERFLOW.into(),
        }
    }
}

impl TaskNames for StreamLabels {
    fn task_names(&self) -> Vec<&str> {
        vec![&self.source_identity, &self.destination_family]
    }

    fn overflowed(&self) -> Self {
        Self {
            source_identity: OVERFLOW.into(),
            destination_family: OVERFLOW.into(),
        }
    }
}

impl TaskNames for EndpointLabels {
    fn task_names(&self) -> Vec<&str> {
        vec![&self.endpoint]
    }

    fn overflowed(&self) -> Self {
        Self {
            service: self.service.clone(),
            endpoint: OVERFLOW.into(),
        }
    }
}

#[cfg(test)]
mod tests;
