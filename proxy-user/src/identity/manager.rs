//! The node proxy's identity state: trust bundle, instance issuer and the SVIDs of the
//! node's tasks, kept fresh in the background and exposed as rustls configs.
//!
//! Refreshing or reloading never tears a connection down: established TLS sessions keep
//! the certificate they were made with, and only new handshakes see the new one, because
//! the resolvers and verifiers read the current state on every handshake.
mod issuer_mode;
mod tls;

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls_pki_types::UnixTime;
use tokio_util::sync::CancellationToken;

use super::{
    IdentityError, Issuer, SpiffeId, Svid, TrustBundle, TrustDomain, TrustStatus, Usage,
    remote::{RemoteConfig, RemoteIssuer},
    verify_peer,
};

/// Called with the new trust state after every successful load or reload.
type TrustObserver = Box<dyn Fn(&TrustStatus) + Send + Sync>;

/// How long the refresher waits after a refresh that left SVIDs due (issuance failed).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Upper bound of one refresher sleep, so a wall-clock jump is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Longest wait between two refresh rounds that keep failing.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);
/// Shortest wait between two failed refresh rounds.
const MIN_RETRY_WAIT: Duration = Duration::from_millis(250);

/// Where the node's identity material lives and how long its SVIDs last.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    pub bundle: PathBuf,
    pub source: SvidSource,
    /// File mode only: the issuer decides SVID lifetimes in issuer mode.
    pub svid_lifetime: Duration,
    /// Trust domains whose peers are accepted; empty means the issuer's own.
    pub allowed_trust_domains: Vec<TrustDomain>,
}

/// Where SVIDs come from.
#[derive(Clone, Debug)]
pub enum SvidSource {
    /// File mode: an issuing CA in a directory with `issuer.pem` and `issuer.key`.
    IssuerDir(PathBuf),
    /// Issuer mode: `ecsmesh issuer`, by task ARN; no CA key on the node.
    Issuer(RemoteConfig),
}

enum Source {
    Local(ArcSwap<Issuer>),
    Remote(Arc<RemoteIssuer>),
}

#[derive(Default)]
struct Table {
    by_id: HashMap<SpiffeId, Arc<Svid>>,
    /// Issuer mode: the task ARNs holding each identity (any of them renews it).
    holders: HashMap<SpiffeId, BTreeSet<String>>,
    /// `SpiffeId::sni()` → identity, for the server certificate resolver.
    by_sni: HashMap<String, SpiffeId>,
}

/// See the module documentation. Shared as `Arc<IdentityManager>`.
pub struct IdentityManager {
    cfg: IdentityConfig,
    allowed: Vec<TrustDomain>,
    bundle: Arc<ArcSwap<TrustBundle>>,
    source: Source,
    svids: RwLock<Table>,
    /// Fingerprints of the bundle's anchors and of the issuer, for `/trust` and metrics.
    status: ArcSwap<TrustStatus>,
    observers: std::sync::Mutex<Vec<TrustObserver>>,
    /// Wakes the refresher when the set of SVIDs changed.
    changed: tokio::sync::Notify,
    /// Consecutive failed refresh rounds (backoff while the issuer is unreachable).
    failures: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for IdentityManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityManager")
            .field("cfg", &self.cfg)
            .field("identities", &self.identities())
            .finish_non_exhaustive()
    }
}

impl IdentityManager {
    /// Loads the bundle and issuer; fails if the issuer does not chain to the bundle, since
    /// every SVID it signed would then be refused by every peer.
    pub fn new(cfg: IdentityConfig) -> Result<Arc<Self>, IdentityError> {
        let (bundle, source, status, own_td) = match &cfg.source {
            SvidSource::IssuerDir(dir) => {
                let (bundle, issuer, status) = load_material(&cfg.bundle, dir)?;
                let td = issuer.instance_id().trust_domain().clone();
                let bundle = Arc::new(ArcSwap::from_pointee(bundle));
                (
                    bundle,
                    Source::Local(ArcSwap::from_pointee(issuer)),
                    status,
                    td,
                )
            }
            SvidSource::Issuer(remote) => {
                let bundle = Arc::new(ArcSwap::from_pointee(TrustBundle::load(&cfg.bundle)?));
                let r = Arc::new(RemoteIssuer::new(remote.clone(), bundle.clone()));
                let chain = r.node_chain().map(|(_, c)| c);
                let status = TrustStatus::of_remote(&bundle.load(), chain.as_deref());
                (
                    bundle,
                    Source::Remote(r),
                    status,
                    remote.trust_domain.clone(),
                )
            }
        };
        log_trust(&status, "trust bundle and issuer loaded");
        let allowed = if cfg.allowed_trust_domains.is_empty() {
            vec![own_td]
        } else {
            cfg.allowed_trust_domains.clone()
        };
        Ok(Arc::new(Self {
            cfg,
            allowed,
            bundle,
            source,
            svids: RwLock::default(),
            status: ArcSwap::from_pointee(status),
            observers: Default::default(),
            changed: tokio::sync::Notify::new(),
            failures: Default::default(),
        }))
    }

    /// The issuer client in issuer mode.
    pub fn remote(&self) -> Option<&Arc<RemoteIssuer>> {
        match &self.source {
            Source::Remote(r) => Some(r),
            Source::Local(_) => None,
        }
    }

    fn local(&self, id: &SpiffeId) -> Result<arc_swap::Guard<Arc<Issuer>>, IdentityError> {
        match &self.source {
            Source::Local(issuer) => Ok(issuer.load()),
            Source::Remote(_) => Err(IdentityError::invalid(
                id,
                "in issuer mode identities come from the issuer, by task ARN",
            )),
        }
    }

    /// What this node trusts and signs with now.
    pub fn trust_status(&self) -> Arc<TrustStatus> {
        self.status.load_full()
    }

    /// Calls `f` with the current trust state now and after every successful reload.
    pub fn observe_trust(&self, f: impl Fn(&TrustStatus) + Send + Sync + 'static) {
        f(&self.status.load());
        self.observers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(f));
    }

    pub fn bundle_handle(&self) -> Arc<ArcSwap<TrustBundle>> {
        self.bundle.clone()
    }

    pub fn allowed(&self) -> &[TrustDomain] {
        &self.allowed
    }

    /// The SVID for `id`, issuing it first if there is none.
    pub fn ensure(&self, id: &SpiffeId) -> Result<Arc<Svid>, IdentityError> {
        if let Some(svid) = self.current(id) {
            return Ok(svid);
        }
        let svid = Arc::new(self.local(id)?.issue_svid(id, self.cfg.svid_lifetime)?);
        let svid = {
            let mut table = self.write();
            table.by_sni.insert(id.sni(), id.clone());
            table.by_id.entry(id.clone()).or_insert(svid).clone()
        };
        self.changed.notify_one();
        Ok(svid)
    }

    pub fn remove(&self, id: &SpiffeId) {
        let mut table = self.write();
        table.by_id.remove(id);
        table.by_sni.remove(&id.sni());
    }

    pub fn current(&self, id: &SpiffeId) -> Option<Arc<Svid>> {
        self.read().by_id.get(id).cloned()
    }

    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<_> = self.read().by_id.keys().cloned().collect();
        ids.sort();
        ids
    }

    pub(crate) fn refresh_due_local(&self) -> usize {
        let now = SystemTime::now();
        let due: Vec<SpiffeId> = self
            .read()
            .by_id
            .values()
            .filter(|s| s.refresh_at() <= now)
            .map(|s| s.id.clone())
            .collect();
        let mut refreshed = 0;
        for id in due {
            match self.reissue(&id) {
                Ok(Some(svid)) => {
                    refreshed += 1;
                    tracing::info!(identity = %id, serial = %svid.serial, "certificate refreshed");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(identity = %id, error = %e, "certificate refresh failed"),
            }
        }
        refreshed
    }

    /// Re-reads bundle and issuer and re-issues every SVID under the new issuer. On any
    /// error nothing changes: the previous good state stays in use.
    pub fn reload(&self) -> Result<(), IdentityError> {
        let (local, dir) = match (&self.source, &self.cfg.source) {
            (Source::Local(local), SvidSource::IssuerDir(dir)) => (local, dir),
            (Source::Remote(remote), _) => {
                // Issuer mode: only the bundle is ours to reload.
                let bundle = TrustBundle::load(&self.cfg.bundle)?;
                let status = TrustStatus::of_remote(&bundle, self.oldest_chain(remote).as_deref());
                self.bundle.store(Arc::new(bundle));
                self.publish(status, "trust bundle reloaded");
                return Ok(());
            }
            (Source::Local(_), SvidSource::Issuer(_)) => unreachable!("source follows config"),
        };
        let (bundle, issuer, status) = load_material(&self.cfg.bundle, dir)?;
        // Issue everything first, then swap, so a failure leaves the old state whole.
        let ids = self.identities();
        let fresh = ids
            .iter()
            .map(|id| Ok(Arc::new(issuer.issue_svid(id, self.cfg.svid_lifetime)?)))
            .collect::<Result<Vec<_>, IdentityError>>()?;
        let issuer_cert = issuer.certificate().clone();
        self.bundle.store(Arc::new(bundle));
        local.store(Arc::new(issuer));
        {
            let mut table = self.write();
            for svid in fresh {
                // Skip identities removed meanwhile.
                if let Some(slot) = table.by_id.get_mut(&svid.id) {
                    *slot = svid;
                }
            }
        }
        // An identity `ensure`d while the fresh set was being issued got its SVID from the
        // previous issuer: re-issue it now, or it would present the old chain until its
        // half life — past an anchor's retirement.
        let stale: Vec<SpiffeId> = self
            .read()
            .by_id
            .values()
            .filter(|s| s.chain.get(1) != Some(&issuer_cert))
            .map(|s| s.id.clone())
            .collect();
        for id in stale {
            if let Err(e) = self.reissue(&id) {
                tracing::warn!(identity = %id, error = %e, "re-issue after reload failed");
            }
        }
        self.changed.notify_one();
        self.publish(status, "trust bundle and issuer reloaded");
        Ok(())
    }

    fn reissue(&self, id: &SpiffeId) -> Result<Option<Arc<Svid>>, IdentityError> {
        let svid = Arc::new(self.local(id)?.issue_svid(id, self.cfg.svid_lifetime)?);
        let mut table = self.write();
        Ok(table.by_id.get_mut(id).map(|slot| {
            *slot = svid.clone();
            svid
        }))
    }

    fn earliest_expiry(&self) -> Option<SystemTime> {
        self.read().by_id.values().map(|s| s.not_after).min()
    }

    fn earliest_refresh(&self) -> Option<SystemTime> {
        let node = self.remote().and_then(|r| r.node_refresh_at());
        self.read()
            .by_id
            .values()
            .map(|s| s.refresh_at())
            .chain(node)
            .min()
    }

    /// Starts the refresher, the file watcher and the SIGHUP handler; all stop on
    /// `shutdown`. Needs a tokio runtime. A watcher or signal handler that cannot be set up
    /// is logged, not fatal: the other reload paths still work.
    pub fn spawn_background(self: &Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(self.clone().refresher(shutdown.clone()));
        let this = self.clone();
        crate::watch::reload_on_change_or_sighup(
            "identity files",
            self.watched_files(),
            shutdown,
            move |trigger| this.reload_logged(trigger),
        );
    }

    fn reload_logged(&self, trigger: &str) {
        if let Err(e) = self.reload() {
            tracing::warn!(trigger, error = %e, "identity reload failed; keeping the previous bundle and issuer");
        }
    }

    async fn refresher(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let wait = match self.earliest_refresh() {
                Some(at) => at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    .min(MAX_SLEEP),
                None => MAX_SLEEP,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.changed.notified() => continue,
                _ = tokio::time::sleep(wait) => {}
            }
            self.refresh_due().await;
            if self
                .earliest_refresh()
                .is_some_and(|at| at <= SystemTime::now())
            {
                // Still due: the issuer (or the CA files) failed. Back off, doubling up
                // to MAX_RETRY_BACKOFF, so an outage is retried without hammering.
                // Never wait past a quarter of the time the soonest certificate has left,
                // so the issuer's return is noticed well before anything expires.
                let n = self
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let left = self
                    .earliest_expiry()
                    .and_then(|at| at.duration_since(SystemTime::now()).ok())
                    .map_or(MAX_RETRY_BACKOFF, |d| (d / 4).max(MIN_RETRY_WAIT));
                let wait = (RETRY_AFTER_FAILURE * 2u32.saturating_pow(n.min(8)))
                    .min(MAX_RETRY_BACKOFF)
                    .min(left);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            } else {
                self.failures.store(0, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    fn watched_files(&self) -> Vec<PathBuf> {
        use crate::watch::absolute;
        let mut files = vec![absolute(&self.cfg.bundle)];
        if let SvidSource::IssuerDir(dir) = &self.cfg.source {
            files.push(absolute(&dir.join(super::ca::ISSUER_CERT_FILE)));
            files.push(absolute(&dir.join(super::ca::ISSUER_KEY_FILE)));
        }
        files
    }

    /// Verifies that `issuer` chains to `bundle` by issuing a throwaway SVID and verifying
    /// it like a peer would.
    fn check_anchored(bundle: &TrustBundle, issuer: &Issuer) -> Result<(), IdentityError> {
        let id = issuer.instance_id();
        let probe = issuer.issue_svid(id, Duration::from_secs(60))?;
        let td = std::slice::from_ref(id.trust_domain());
        verify_peer(
            bundle,
            td,
            &probe.chain[0],
            &probe.chain[1..],
            UnixTime::now(),
            Usage::Server,
        )
        .map(drop)
        .map_err(|rejection| IdentityError::IssuerNotTrusted {
            issuer: id.clone(),
            rejection: Box::new(rejection),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table inconsistent (every write
        // is a single insert/remove), so poisoning is ignored.
        self.svids.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.svids.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn load_material(
    bundle: &Path,
    issuer_dir: &Path,
) -> Result<(TrustBundle, Issuer, TrustStatus), IdentityError> {
    let bundle = TrustBundle::load(bundle)?;
    let issuer = Issuer::load(issuer_dir)?;
    IdentityManager::check_anchored(&bundle, &issuer)?;
    let status = TrustStatus::of(&bundle, &issuer).ok_or_else(|| {
        IdentityError::invalid(
            issuer_dir.display(),
            "the issuer chains to no single anchor of the bundle",
        )
    })?;
    Ok((bundle, issuer, status))
}

/// One line per load with every fingerprint, so a rotation's rollout can be followed in
/// the logs as well as on `/trust` and in metrics.
fn log_trust(status: &TrustStatus, message: &str) {
    let anchors: Vec<&str> = status.anchors.iter().map(|f| f.short()).collect();
    match &status.issuer {
        Some(issuer) => tracing::info!(
            anchors = %anchors.join(","),
            issuer = %issuer.identity,
            issuer_fingerprint = %issuer.fingerprint.short(),
            issuer_anchor = %issuer.anchor.short(),
            "{message}"
        ),
        None => tracing::info!(anchors = %anchors.join(","), "{message} (no issuing CA seen yet)"),
    }
}
