//! Tests of the identity module, with the fixtures they share: a scratch directory and a
//! CA with one instance issuer in it.
mod ca;
mod cli;
mod handshake;
mod manager;
mod spiffe;
mod verify;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rustls_pki_types::{CertificateDer, UnixTime};

use super::{
    Ca, IdentityConfig, IdentityManager, Issuer, LeafSpec, Rejection, SpiffeId, TrustBundle,
    TrustDomain, Usage, verify_peer,
};

/// A directory under the system temp dir, removed on drop (the unit tests' one scratch
/// directory type).
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ecsmesh-unit-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA in `<tmp>/ca` with instance `i-1` issued into `<tmp>/node`.
pub(super) struct Pki {
    pub tmp: TempDir,
    pub ca: Ca,
    pub td: TrustDomain,
    pub node: PathBuf,
}

impl Pki {
    pub(super) fn new(td: &str) -> Self {
        let tmp = TempDir::new(td);
        let td = TrustDomain::new(td).unwrap();
        let mut ca = Ca::init(&tmp.path().join("ca"), td.clone()).unwrap();
        let node = tmp.path().join("node");
        ca.issue_intermediate("i-1", &node).unwrap();
        Self { tmp, ca, td, node }
    }

    pub(super) fn id(&self, path: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://{}{path}", self.td)).unwrap()
    }

    pub(super) fn issuer(&self) -> Issuer {
        Issuer::load(&self.node).unwrap()
    }

    pub(super) fn bundle(&self) -> TrustBundle {
        TrustBundle::load(&self.node.join("bundle.pem")).unwrap()
    }

    /// A leaf from `Ca::issue_leaf`, signed by the node issuer unless the spec says else.
    pub(super) fn leaf(&self, spec: LeafSpec) -> Vec<CertificateDer<'static>> {
        let (chain, _key) = self.ca.issue_leaf(&spec).unwrap();
        certs(&chain)
    }

    pub(super) fn leaf_spec(&self, uris: &[&str]) -> LeafSpec {
        LeafSpec {
            uris: uris.iter().map(|s| s.to_string()).collect(),
            issuer_dir: Some(self.node.clone()),
            ..LeafSpec::default()
        }
    }

    pub(super) fn manager(&self, lifetime: Duration) -> Arc<IdentityManager> {
        IdentityManager::new(IdentityConfig {
            bundle: self.node.join("bundle.pem"),
            source: super::manager::SvidSource::IssuerDir(self.node.clone()),
            svid_lifetime: lifetime,
            allowed_trust_domains: vec![self.td.clone()],
        })
        .unwrap()
    }

    /// Verifies `chain` (leaf first) against this PKI's node bundle, now, as a client.
    pub(super) fn check(&self, chain: &[CertificateDer<'_>]) -> Result<SpiffeId, Rejection> {
        check_with(&self.bundle(), std::slice::from_ref(&self.td), chain)
    }
}

pub(super) fn check_with(
    bundle: &TrustBundle,
    allowed: &[TrustDomain],
    chain: &[CertificateDer<'_>],
) -> Result<SpiffeId, Rejection> {
    verify_peer(
        bundle,
        allowed,
        &chain[0],
        &chain[1..],
        UnixTime::now(),
        Usage::Client,
    )
}

pub(super) fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

pub(super) fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}
