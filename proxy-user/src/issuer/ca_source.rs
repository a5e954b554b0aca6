//! The issuing CA, the root bundle and the issuer's own TLS certificate, swapped as a
//! unit on reload. A candidate CA is accepted only if a certificate it issues verifies
//! against the bundle — the same check every node will make — so a reload with a wrong
//! key, a foreign CA or a mismatched bundle keeps the last good set instead.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{server::ResolvesServerCert, sign::CertifiedKey};
use rustls_pki_types::UnixTime;
use tokio_util::sync::CancellationToken;

use crate::identity::{
    IdentityError, Issuer, Svid, TrustBundle, TrustDomain, Usage, protocol::issuer_id, verify_peer,
};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("CA {ca} is of trust domain {got}, the issuer serves {expected}")]
    TrustDomain {
        ca: String,
        got: TrustDomain,
        expected: TrustDomain,
    },
    #[error("CA does not chain to the bundle: {0}")]
    NotInBundle(String),
    #[error("secret {id}: {message}")]
    Secret { id: String, message: String },
}

struct Current {
    issuer: Arc<Issuer>,
    bundle: Arc<TrustBundle>,
    server: Svid,
}

pub struct Authority {
    td: TrustDomain,
    server_lifetime: Duration,
    current: ArcSwap<Current>,
    /// Wakes the server-certificate refresher after a reload.
    changed: tokio::sync::Notify,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("td", &self.td)
            .finish_non_exhaustive()
    }
}

impl Authority {
    pub fn new(
        td: TrustDomain,
        issuer: Issuer,
        bundle: TrustBundle,
        server_lifetime: Duration,
    ) -> Result<Self, CaError> {
        let current = Self::candidate(&td, issuer, bundle, server_lifetime)?;
        Ok(Self {
            td,
            server_lifetime,
            current: ArcSwap::from_pointee(current),
            changed: tokio::sync::Notify::new(),
        })
    }

    fn candidate(
        td: &TrustDomain,
        issuer: Issuer,
        bundle: TrustBundle,
        lifetime: Duration,
    ) -> Result<Current, CaError> {
        let got = issuer.instance_id().trust_domain();
        if got != td {
            return Err(CaError::TrustDomain {
                ca: issuer.instance_id().to_string(),
                got: got.clone(),
                expected: td.clone(),
            });
        }
        let server = issuer.issue_svid(&issuer_id(td), lifetime)?;
        verify_peer(
            &bundle,
            std::slice::from_ref(td),
            &server.chain[0],
            &server.chain[1..],
            UnixTime::now(),
            Usage::Server,
        )
        .map_err(|r| CaError::NotInBundle(r.to_string()))?;
        Ok(Current {
            issuer: Arc::new(issuer),
            bundle: Arc::new(bundle),
            server,
        })
    }

    /// Installs a new CA and bundle if they pass the checks of [`Authority::new`].
    pub fn replace(&self, issuer: Issuer, bundle: TrustBundle) -> Result<(), CaError> {
        let next = Self::candidate(&self.td, issuer, bundle, self.server_lifetime)?;
        self.current.store(Arc::new(next));
        self.changed.notify_one();
        Ok(())
    }

    pub fn issuer(&self) -> Arc<Issuer> {
        self.current.load().issuer.clone()
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.current.load().bundle.clone()
    }

    fn renew_server(&self) -> Result<(), CaError> {
        let cur = self.current.load();
        let server = cur
            .issuer
            .issue_svid(&issuer_id(&self.td), self.server_lifetime)?;
        let next = Arc::new(Current {
            issuer: cur.issuer.clone(),
            bundle: cur.bundle.clone(),
            server,
        });
        // A reload in between installed its own fresh certificate: keep that one.
        self.current.compare_and_swap(&cur, next);
        Ok(())
    }

    /// Re-issues the TLS server certificate at half its life (and retries every 10 s
    /// after a failure), until `shutdown`. Reloads issue their own.
    pub async fn keep_server_cert_fresh(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let at = self.current.load().server.refresh_at();
            let wait = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.changed.notified() => continue,
                _ = tokio::time::sleep(wait) => {}
            }
            if let Err(e) = self.renew_server() {
                tracing::error!(error = %e, "cannot renew the issuer's TLS certificate");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}

/// The resolver rustls asks for the server certificate on every handshake.
#[derive(Debug)]
pub struct ServerCert(pub Arc<Authority>);

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().server.certified_key())
    }
}

/// Loads the CA from a Secrets Manager secret: SecretString JSON
/// `{"certificate": PEM, "private_key": PEM}`.
pub async fn load_secret(
    client: &aws_sdk_secretsmanager::Client,
    id: &str,
) -> Result<Issuer, CaError> {
    #[derive(serde::Deserialize)]
    struct Secret {
        certificate: String,
        private_key: String,
    }
    let err = |message: String| CaError::Secret {
        id: id.to_owned(),
        message,
    };
    let out = client
        .get_secret_value()
        .secret_id(id)
        .send()
        .await
        .map_err(|e| err(aws_sdk_secretsmanager::error::DisplayErrorContext(e).to_string()))?;
    let text = out
        .secret_string()
        .ok_or_else(|| err("no SecretString".into()))?;
    let s: Secret = serde_json::from_str(text).map_err(|e| {
        err(format!(
            "not {{\"certificate\", \"private_key\"}} JSON: {e}"
        ))
    })?;
    Ok(Issuer::from_pem(
        &s.certificate,
        &s.private_key,
        Path::new(&format!("secret {id}")),
    )?)
}

/// The files a `ca_dir` CA is reloaded from.
pub fn dir_files(dir: &Path) -> Vec<PathBuf> {
    use crate::identity::ca::{ISSUER_CERT_FILE, ISSUER_KEY_FILE};
    vec![dir.join(ISSUER_CERT_FILE), dir.join(ISSUER_KEY_FILE)]
}
