use std::sync::{Arc, atomic::AtomicUsize};

use prometheus_client::metrics::{counter::Counter, family::Family};

use super::*;
use crate::metrics::EndpointLabels;

fn bounded(
    cap: usize,
) -> (
    Bounded<EndpointLabels, Counter>,
    Family<MetricLabels, Counter>,
) {
    let overflow = Family::default();
    let b = Bounded::new(
        "endpoint_requests",
        Family::default(),
        &Arc::new(AtomicUsize::new(cap)),
        &overflow,
    );
    (b, overflow)
}

fn ep(service: &str, endpoint: &str) -> EndpointLabels {
    EndpointLabels {
        service: service.into(),
        endpoint: endpoint.into(),
    }
}

#[test]
fn beyond_the_cap_new_label_sets_fold_into_the_overflow_series() {
    let (b, overflow) = bounded(2);
    b.get_or_create(&ep("web", "10.0.0.1:80")).inc();
    b.get_or_create(&ep("web", "10.0.0.2:80")).inc();
    b.get_or_create(&ep("web", "10.0.0.3:80")).inc();
    b.get_or_create(&ep("web", "10.0.0.4:80")).inc();
    // Existing series still count as themselves.
    b.get_or_create(&ep("web", "10.0.0.1:80")).inc();
    let fam = b.family();
    assert_eq!(fam.get(&ep("web", "10.0.0.1:80")).unwrap().get(), 2);
    assert!(fam.get(&ep("web", "10.0.0.3:80")).is_none());
    assert_eq!(fam.get(&ep("web", OVERFLOW)).unwrap().get(), 2);
    let folded = overflow
        .get(&MetricLabels {
            metric: "endpoint_requests",
        })
        .unwrap()
        .get();
    assert_eq!(folded, 2);
    // Two real series plus the overflow series.
    assert_eq!(b.series_count(), 3);
}

#[test]
fn removing_a_gone_name_frees_its_series_and_its_place_under_the_cap() {
    let (b, _) = bounded(2);
    b.get_or_create(&ep("web", "10.0.0.1:80")).inc();
    b.get_or_create(&ep("web", "10.0.0.2:80")).inc();
    let removed = b.remove_mentioning(&|n| n == "10.0.0.1:80");
    assert_eq!(removed, 1);
    assert_eq!(b.series_count(), 1);
    assert!(b.family().get(&ep("web", "10.0.0.1:80")).is_none());
    // Below the cap again: a new endpoint gets its own series.
    b.get_or_create(&ep("web", "10.0.0.3:80")).inc();
    assert!(b.family().get(&ep("web", "10.0.0.3:80")).is_some());
    assert!(b.family().get(&ep("web", OVERFLOW)).is_none());
}

fn names(list: &[&str]) -> HashSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn a_name_is_gone_after_the_grace_period_unless_it_comes_back() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut j = Janitor::new(s(10));
    assert!(j.sweep(t0, names(&["a", "b", "c"]), []).is_empty());
    // "b" left discovery; "d" was enrolled and stopped between two sweeps.
    assert!(
        j.sweep(t0 + s(1), names(&["a", "c"]), ["d".into()])
            .is_empty()
    );
    // "c" leaves, then comes back within the grace period: kept.
    assert!(j.sweep(t0 + s(2), names(&["a"]), []).is_empty());
    assert!(j.sweep(t0 + s(5), names(&["a", "c"]), []).is_empty());
    assert_eq!(
        j.sweep(t0 + s(11), names(&["a", "c"]), []),
        names(&["b", "d"])
    );
    // Still removed on later sweeps (late connections re-create series) ...
    assert_eq!(
        j.sweep(t0 + s(20), names(&["a", "c"]), []),
        names(&["b", "d"])
    );
    // ... until a name is live again.
    assert_eq!(
        j.sweep(t0 + s(21), names(&["a", "b", "c"]), []),
        names(&["d"])
    );
    // A departed name that is still live elsewhere (another task of the family) stays.
    assert_eq!(
        j.sweep(t0 + s(40), names(&["a", "b", "c"]), ["a".into()]),
        names(&["d"])
    );
    assert_eq!(
        j.sweep(t0 + s(60), names(&["a", "b", "c"]), []),
        names(&["d"])
    );
    // And after KEEP_REMOVING the name is forgotten.
    let later = t0 + s(11) + KEEP_REMOVING;
    assert!(j.sweep(later, names(&["a", "b", "c"]), []).is_empty());
}
