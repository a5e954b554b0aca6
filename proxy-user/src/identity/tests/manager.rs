use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Pki;
use crate::identity::{Ca, IdentityConfig, IdentityError, IdentityManager};

const HOUR: Duration = Duration::from_secs(3600);

/// `sighup_reloads` raises SIGHUP in this test process, which reloads every manager
/// running in it: tests that count reloads hold this lock, as does that one.
static SIGHUP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[test]
fn ensure_issues_once_and_remove_forgets() {
    let pki = Pki::new("example.org");
    let m = pki.manager(HOUR);
    let a = pki.id("/ecs/prod/a");
    let b = pki.id("/ecs/prod/b");
    assert!(m.current(&a).is_none());
    let first = m.ensure(&a).unwrap();
    assert_eq!(m.ensure(&a).unwrap().serial, first.serial);
    m.ensure(&b).unwrap();
    assert_eq!(m.identities(), vec![a.clone(), b.clone()]);
    m.remove(&a);
    assert!(m.current(&a).is_none());
    assert_eq!(m.identities(), vec![b]);
    assert_eq!(m.allowed(), std::slice::from_ref(&pki.td));
    assert_eq!(m.bundle_handle().load().len(), 1);
}

#[test]
fn new_refuses_an_issuer_the_bundle_does_not_anchor() {
    let pki = Pki::new("example.org");
    let other = Pki::new("example.org");
    let err = IdentityManager::new(IdentityConfig {
        bundle: pki.node.join("bundle.pem"),
        source: crate::identity::manager::SvidSource::IssuerDir(other.node.clone()),
        svid_lifetime: HOUR,
        allowed_trust_domains: vec![],
    })
    .unwrap_err();
    assert!(
        matches!(err, IdentityError::IssuerNotTrusted { .. }),
        "{err}"
    );
}

#[test]
fn refresh_due_reissues_at_half_life() {
    let pki = Pki::new("example.org");
    let id = pki.id("/ecs/prod/a");
    // Long-lived: nothing is due.
    let long = pki.manager(HOUR);
    long.ensure(&id).unwrap();
    assert_eq!(long.refresh_due_local(), 0);

    let m = pki.manager(Duration::from_secs(2));
    let before = m.ensure(&id).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(m.refresh_due_local(), 1);
    let after = m.current(&id).unwrap();
    assert_ne!(after.serial, before.serial);
    assert!(after.not_after > before.not_after);
}

#[test]
fn reload_picks_up_a_rotation_and_keeps_the_old_state_on_errors() {
    let pki = Pki::new("example.org");
    let id = pki.id("/ecs/prod/a");
    let m = pki.manager(HOUR);
    let before = m.ensure(&id).unwrap();

    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    m.observe_trust(move |s| log.lock().unwrap().push(s.clone()));
    let first = m.trust_status();
    assert_eq!(first.anchors.len(), 1);
    assert_eq!(first.issuer.as_ref().unwrap().anchor, first.anchors[0]);

    let mut ca = Ca::open(&pki.tmp.path().join("ca")).unwrap();
    let staged = ca.rotate().unwrap();
    m.reload().unwrap();
    // Step 1: the new anchor is trusted, the issuer has not moved.
    let status = m.trust_status();
    assert_eq!(status.anchors, [first.anchors[0].clone(), staged.clone()]);
    assert_eq!(status.issuer, first.issuer);
    assert_eq!(m.bundle_handle().load().len(), 2);
    ca.activate(Duration::ZERO).unwrap();
    m.reload().unwrap();
    assert_eq!(m.trust_status().issuer.as_ref().unwrap().anchor, staged);
    assert_eq!(
        seen.lock().unwrap().len(),
        3,
        "observer: now and after each reload"
    );
    let after = m.current(&id).unwrap();
    assert_ne!(after.serial, before.serial);
    assert_eq!(&after.chain[1], pki.issuer().certificate());

    // A broken issuer key: reload fails, nothing changes.
    std::fs::write(pki.node.join("issuer.key"), "not a key").unwrap();
    ca.retire().unwrap();
    assert!(m.reload().is_err());
    assert_eq!(m.bundle_handle().load().len(), 2);
    assert_eq!(m.current(&id).unwrap().serial, after.serial);
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn background_watcher_reloads_on_file_change() {
    let pki = Pki::new("example.org");
    let id = pki.id("/ecs/prod/a");
    let m = pki.manager(HOUR);
    let before = m.ensure(&id).unwrap();
    let shutdown = CancellationToken::new();
    m.spawn_background(shutdown.clone());
    // Let the watcher start before the files change.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ca = Ca::open(&pki.tmp.path().join("ca")).unwrap();
    ca.rotate().unwrap();
    ca.activate(Duration::ZERO).unwrap();
    wait_for("reload after rotation", || {
        m.bundle_handle().load().len() == 2
            && m.current(&id).unwrap().chain[1] == *pki.issuer().certificate()
    })
    .await;
    assert_ne!(m.current(&id).unwrap().serial, before.serial);
    shutdown.cancel();
}

#[tokio::test]
async fn reading_the_watched_files_does_not_reload() {
    let _no_sighup = SIGHUP.lock().await;
    let pki = Pki::new("example.org");
    let m = pki.manager(HOUR);
    let reloads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = reloads.clone();
    // Called once now, then once per reload.
    m.observe_trust(move |_| {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    let reloads_since =
        |r: &std::sync::atomic::AtomicUsize| r.load(std::sync::atomic::Ordering::SeqCst) - 1;
    let shutdown = CancellationToken::new();
    m.spawn_background(shutdown.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // What a sidecar on the same instance, `ca status` or a backup does: read the files.
    for f in ["bundle.pem", "issuer.pem", "issuer.key"] {
        std::fs::read(pki.node.join(f)).unwrap();
    }
    // Well past the debounce: a reload would have happened (and, before the fix, kept
    // happening, since each reload reads the files again).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let n = reloads_since(&reloads);
    assert_eq!(n, 0, "reading the files triggered {n} reload(s)");
    // A change still reloads, once.
    let mut ca = Ca::open(&pki.tmp.path().join("ca")).unwrap();
    ca.rotate().unwrap();
    wait_for("reload after a change", || {
        m.bundle_handle().load().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let n = reloads_since(&reloads);
    assert!(
        (1..=2).contains(&n),
        "one change (the bundle, maybe seen in two debounce windows) gave {n} reloads"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn background_refresher_reissues_before_expiry() {
    let pki = Pki::new("example.org");
    let id = pki.id("/ecs/prod/a");
    let m = pki.manager(Duration::from_secs(2));
    let shutdown = CancellationToken::new();
    m.spawn_background(shutdown.clone());
    let first = m.ensure(&id).unwrap();
    wait_for("refresh", || m.current(&id).unwrap().serial != first.serial).await;
    shutdown.cancel();
}

#[tokio::test]
async fn sighup_reloads() {
    let _only_me = SIGHUP.lock().await;
    let pki = Pki::new("example.org");
    let m = pki.manager(HOUR);
    // Change the files before anything watches them: only SIGHUP can notice.
    let mut ca = Ca::open(&pki.tmp.path().join("ca")).unwrap();
    ca.rotate().unwrap();
    let shutdown = CancellationToken::new();
    m.spawn_background(shutdown.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(m.bundle_handle().load().len(), 1);
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for("reload on SIGHUP", || m.bundle_handle().load().len() == 2).await;
    shutdown.cancel();
}
