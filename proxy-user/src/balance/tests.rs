use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::*;

fn ep(port: u16, subset: Option<&str>, weight: u32) -> Endpoint {
    Endpoint {
        service: "orders".into(),
        addr: SocketAddr::from(([10, 0, 0, 2], port)),
        family: "orders".into(),
        weight,
        subset: subset.map(str::to_owned),
        tunnel: "10.0.0.2:15008".parse().unwrap(),
        task: None,
        identity: None,
    }
}

fn service() -> Arc<ServiceState> {
    Balancer::default().service("orders", BudgetSettings::default())
}

const MS: Duration = Duration::from_millis(1);

/// Sends `n` requests, each answered at once by `answer(endpoint)`; returns the split.
fn run(
    s: &Arc<ServiceState>,
    eps: &[Endpoint],
    n: usize,
    start: Instant,
    answer: impl Fn(SocketAddr, usize) -> Outcome,
) -> HashMap<SocketAddr, usize> {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut split = HashMap::new();
    for i in 0..n {
        let now = start + MS * i as u32;
        let f = s.pick(eps, &[], now, &mut rng).unwrap();
        *split.entry(f.addr()).or_default() += 1;
        let out = answer(f.addr(), i);
        f.finish(out, now);
    }
    split
}

#[test]
fn a_slower_endpoint_gets_few_requests() {
    let s = service();
    let eps = [ep(1, None, 1), ep(2, None, 1), ep(3, None, 1)];
    let slow = eps[2].addr;
    let split = run(&s, &eps, 2000, Instant::now(), |a, _| {
        Outcome::Success(if a == slow { 51 * MS } else { MS })
    });
    assert!(split[&slow] < 2000 * 5 / 100, "{split:?}");
}

#[test]
fn a_fast_failure_does_not_look_best() {
    let s = service();
    let eps = [ep(1, None, 1), ep(2, None, 1), ep(3, None, 1)];
    let bad = eps[0].addr;
    // The bad endpoint fails at once (a 503 in microseconds); the others take 5 ms.
    let split = run(&s, &eps, 2000, Instant::now(), |a, _| {
        if a == bad {
            Outcome::Failure(Duration::from_micros(50))
        } else {
            Outcome::Success(5 * MS)
        }
    });
    assert!(split[&bad] < 2000 * 5 / 100, "{split:?}");
}

#[test]
fn the_estimate_peaks_at_once_and_decays_with_time() {
    let t0 = Instant::now();
    let mut st = EndpointState::new(t0);
    st.observe(100 * MS, t0);
    assert_eq!(
        st.cost(t0),
        (100 * MS).as_nanos() as f64,
        "a peak is believed at once"
    );
    // One decay time later, about e^-1 of it is left.
    let later = st.cost(t0 + DECAY) / (100 * MS).as_nanos() as f64;
    assert!((later - (-1f64).exp()).abs() < 1e-6, "{later}");
    // A fast answer soon after moves the estimate only a little (EWMA, not replace).
    st.observe(MS, t0 + 100 * MS);
    assert!(st.cost(t0 + 100 * MS) > (90 * MS).as_nanos() as f64);
    // Pending requests weigh: two in flight triple the cost.
    st.pending = 2;
    let c = st.cost(t0 + 100 * MS);
    st.pending = 0;
    assert!((c / st.cost(t0 + 100 * MS) - 3.0).abs() < 1e-9);
}

#[test]
fn consecutive_failures_eject_and_backoff_readmits() {
    let s = service();
    let eps = [ep(1, None, 1), ep(2, None, 1)];
    let (bad, good) = (eps[0].addr, eps[1].addr);
    let t0 = Instant::now();
    let mut rng = fastrand::Rng::with_seed(1);
    let fail = |now| {
        // Force the pick onto `bad` by trying `good` already.
        let f = s
            .pick(&eps, &[good], now, &mut fastrand::Rng::with_seed(2))
            .unwrap();
        assert_eq!(f.addr(), bad);
        f.finish(Outcome::Failure(MS), now);
    };
    for _ in 0..EJECT_AFTER {
        fail(t0);
    }
    assert!(s.state(bad).unwrap().ejected(t0));
    // Ejected: not picked even when the other one was tried (it falls back to `good`).
    for i in 0..50 {
        let f = s.pick(&eps, &[good], t0 + MS * i, &mut rng).unwrap();
        assert_eq!(f.addr(), good);
    }
    // Re-admitted after the first backoff.
    let back = t0 + BASE_EJECTION + MS;
    assert!(!s.state(bad).unwrap().ejected(back));
    // Failing again at once ejects it for twice as long.
    for _ in 0..EJECT_AFTER {
        fail(back);
    }
    let st = s.state(bad).unwrap();
    assert!(st.ejected(back + BASE_EJECTION * 2 - MS));
    assert!(!st.ejected(back + BASE_EJECTION * 2 + MS));
    // A success after re-admission resets the backoff.
    let later = back + BASE_EJECTION * 2 + MS;
    let f = s.pick(&eps, &[good], later, &mut rng).unwrap();
    f.finish(Outcome::Success(MS), later);
    assert_eq!(s.state(bad).unwrap().ejections, 0);
}

#[test]
fn every_endpoint_ejected_still_picks_one() {
    let s = service();
    let eps = [ep(1, None, 1)];
    let t0 = Instant::now();
    let mut rng = fastrand::Rng::with_seed(3);
    for _ in 0..EJECT_AFTER {
        s.pick(&eps, &[], t0, &mut rng)
            .unwrap()
            .finish(Outcome::Failure(MS), t0);
    }
    assert!(s.state(eps[0].addr).unwrap().ejected(t0));
    assert_eq!(s.pick(&eps, &[], t0, &mut rng).unwrap().addr(), eps[0].addr);
}

#[test]
fn a_retry_goes_to_another_endpoint_when_there_is_one() {
    let s = service();
    let eps = [ep(1, None, 1), ep(2, None, 1), ep(3, None, 1)];
    let mut rng = fastrand::Rng::with_seed(5);
    let now = Instant::now();
    for _ in 0..100 {
        let first = s.pick(&eps, &[], now, &mut rng).unwrap();
        let tried = [first.addr()];
        let second = s.pick(&eps, &tried, now, &mut rng).unwrap();
        assert_ne!(second.addr(), first.addr());
    }
    // Only one endpoint: the retry goes back to it.
    let one = [ep(9, None, 1)];
    let tried = [one[0].addr];
    assert_eq!(
        s.pick(&one, &tried, now, &mut rng).unwrap().addr(),
        one[0].addr
    );
}

#[test]
fn pending_counts_until_finished_or_dropped() {
    let s = service();
    let eps = [ep(1, None, 1)];
    let mut rng = fastrand::Rng::with_seed(5);
    let now = Instant::now();
    let a = s.pick(&eps, &[], now, &mut rng).unwrap();
    let b = s.pick(&eps, &[], now, &mut rng).unwrap();
    assert_eq!(s.state(eps[0].addr).unwrap().pending(), 2);
    a.finish(Outcome::Success(MS), now);
    drop(b);
    assert_eq!(s.state(eps[0].addr).unwrap().pending(), 0);
}

#[test]
fn subsets_split_by_weight_and_weight_zero_gets_nothing() {
    let s = service();
    let eps = [
        ep(1, Some("v1"), 90),
        ep(2, Some("v1"), 90),
        ep(3, Some("v2"), 10),
    ];
    let split = run(&s, &eps, 5000, Instant::now(), |_, _| Outcome::Success(MS));
    let v2 = split.get(&eps[2].addr).copied().unwrap_or(0) as f64 / 5000.0;
    assert!((v2 - 0.10).abs() < 0.02, "v2 got {v2}");
    let shifted = [
        ep(1, Some("v1"), 0),
        ep(2, Some("v1"), 0),
        ep(3, Some("v2"), 100),
    ];
    let split = run(&s, &shifted, 1000, Instant::now(), |_, _| {
        Outcome::Success(MS)
    });
    assert_eq!(split.len(), 1, "{split:?}");
    assert_eq!(split[&eps[2].addr], 1000);
    let off = [ep(1, Some("v1"), 0)];
    assert!(
        s.pick(&off, &[], Instant::now(), &mut fastrand::Rng::new())
            .is_none()
    );
}

#[test]
fn budget_allows_twenty_percent_plus_ten_per_second() {
    let t0 = Instant::now();
    let b = Budget::starting_at(BudgetSettings::default(), t0);
    // 30 s of 100 requests a second, each wanting a retry.
    let mut retries = 0;
    for ms in 0..30_000u32 {
        let now = t0 + Duration::from_millis(u64::from(ms));
        if ms % 10 == 0 {
            b.deposit(now);
            if b.try_withdraw(now) {
                retries += 1;
            }
        }
    }
    // At most 20 % of 3,000 requests + 10/s over 30 s, and not far below it.
    assert!(retries <= 600 + 300, "{retries}");
    assert!(retries >= 600, "{retries}");
}

#[test]
fn a_quiet_service_may_still_retry_a_little() {
    let t0 = Instant::now();
    let b = Budget::starting_at(BudgetSettings::default(), t0);
    let granted = (0..1000).filter(|_| b.try_withdraw(t0)).count();
    assert_eq!(granted, 100, "10/s over the 10 s window");
    // Withdrawals expire with the window.
    assert!(b.try_withdraw(t0 + Duration::from_secs(11)));
}
