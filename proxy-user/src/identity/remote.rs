//! Issuer mode of a node: no CA key on the node. The node proves which EC2 instance it is
//! (the instance identity document and its AWS signature, from IMDS: SPIRE's `aws_iid`),
//! receives a short-lived node certificate `spiffe://<td>/ecsmesh/node/<instance-id>`, and
//! with it asks `ecsmesh issuer` for each task's SVID by task ARN. Every key is made here
//! and never leaves the node: requests carry CSRs (see [`super::protocol`]).
//!
//! The node certificate and its key are kept in `<state_dir>/identity/` (mode 0600) so a
//! restarted proxy renews over mTLS instead of attesting again (the issuer refuses a second
//! attestation of an instance while its node certificate is valid: a replay).
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::{SignatureScheme, client::ResolvesClientCert, sign::CertifiedKey};
use rustls_pki_types::CertificateDer;
use serde::Serialize;

mod saved;
mod task_role;
pub(crate) mod wire;

pub use task_role::{TaskRoleConfig, sign_get_caller_identity};
pub(crate) use wire::imds_get;
use wire::{authority, http_call};

use super::{
    IdentityError, SpiffeServerVerifier, Svid, TrustBundle, TrustDomain, Usage,
    protocol::{self, AttestRequest, Issued, NodeRenewRequest, Reason, Refusal, SvidRequest},
};

pub const NODE_KEY_FILE: &str = "node.key";
pub const NODE_CERT_FILE: &str = "node.pem";

/// Where the issuer is and how this node attests.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    pub issuer_url: http::Uri,
    pub attestation: Attestation,
    pub trust_domain: TrustDomain,
    /// Keeps the node certificate and key (`identity/` below the proxy's state dir).
    pub state_dir: PathBuf,
}

/// How this proxy proves what it is to the issuer.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attestation {
    /// A node: the instance identity document from IMDS, then a node certificate that
    /// asks for the SVIDs of the tasks on this instance.
    Instance {
        #[serde(serialize_with = "crate::config::display")]
        imds_url: http::Uri,
    },
    /// A sidecar: its task's own IAM role credentials (no node certificate).
    TaskRole(Box<TaskRoleConfig>),
}

/// The calls to the issuer, as metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Attest,
    Node,
    Svid,
    Task,
}

impl Call {
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Attest => "attest",
            Call::Node => "node",
            Call::Svid => "svid",
            Call::Task => "task",
        }
    }
    fn path(self) -> &'static str {
        match self {
            Call::Attest => protocol::ATTEST_PATH,
            Call::Node => protocol::NODE_PATH,
            Call::Svid => protocol::SVID_PATH,
            Call::Task => protocol::TASK_PATH,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("issuer refused {call}: {reason}: {message}", call = .call.as_str())]
    Refused {
        call: Call,
        reason: Reason,
        message: String,
    },
    #[error("issuer unreachable for {call}: {message}", call = .call.as_str())]
    Unreachable { call: Call, message: String },
    #[error("issuer answered {call} with something unusable: {message}", call = .call.as_str())]
    Protocol { call: Call, message: String },
    #[error("instance metadata (IMDS) at {url}: {message}")]
    Imds { url: String, message: String },
    #[error("task role credentials: {message}")]
    Credentials { message: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

impl RemoteError {
    /// The `result` label of `ecsmesh_issuer_calls_total` for this failure.
    pub fn label(&self) -> &'static str {
        match self {
            RemoteError::Refused { reason, .. } => reason.as_str(),
            RemoteError::Unreachable { .. } => "unreachable",
            RemoteError::Protocol { .. } => "bad_response",
            RemoteError::Imds { .. } => "imds_unavailable",
            RemoteError::Credentials { .. } => "credentials_unavailable",
            RemoteError::Identity(_) => "local_error",
        }
    }

    /// A refusal that names the task (not the node or the issuer): asking again for the
    /// same task will not help until ECS says otherwise.
    pub fn about_task(&self) -> bool {
        matches!(
            self,
            RemoteError::Refused {
                reason: Reason::UnknownTask
                    | Reason::NotOnInstance
                    | Reason::TaskNotRunning
                    | Reason::NoIdentity
                    | Reason::NotTaskCredentials
                    | Reason::RoleMismatch,
                ..
            }
        )
    }
}

/// Called after every issuer call with (call, result label).
pub type CallObserver = Box<dyn Fn(Call, &str) + Send + Sync>;

/// The node's certificate for talking to the issuer.
struct NodeCert {
    certified: Arc<CertifiedKey>,
    chain: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl NodeCert {
    fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life / 2
    }
}

/// See the module documentation.
pub struct RemoteIssuer {
    cfg: RemoteConfig,
    bundle: Arc<arc_swap::ArcSwap<TrustBundle>>,
    node: ArcSwapOption<NodeCert>,
    /// Serialises attestation and node renewal (one at a time, never two attestations).
    node_lock: tokio::sync::Mutex<()>,
    observer: std::sync::Mutex<Option<CallObserver>>,
}

impl std::fmt::Debug for RemoteIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteIssuer")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl RemoteIssuer {
    /// Loads a saved node certificate when it is still valid under `bundle`.
    pub fn new(cfg: RemoteConfig, bundle: Arc<arc_swap::ArcSwap<TrustBundle>>) -> Self {
        let this = Self {
            cfg,
            bundle,
            node: ArcSwapOption::empty(),
            node_lock: tokio::sync::Mutex::new(()),
            observer: std::sync::Mutex::new(None),
        };
        if matches!(this.cfg.attestation, Attestation::TaskRole(_)) {
            return this;
        }
        match this.load_saved() {
            Ok(Some(node)) => {
                tracing::info!(dir = %this.dir().display(), "saved node certificate loaded; renewing over mTLS instead of attesting again");
                this.node.store(Some(Arc::new(node)));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "saved node certificate not usable; attesting"),
        }
        this
    }

    pub fn observe(&self, f: CallObserver) {
        *self.observer.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    fn note(&self, call: Call, result: &str) {
        if let Some(f) = &*self.observer.lock().unwrap_or_else(|e| e.into_inner()) {
            f(call, result);
        }
    }

    fn dir(&self) -> PathBuf {
        self.cfg.state_dir.clone()
    }

    /// When the node certificate should be renewed (half its life); None without one.
    pub fn node_refresh_at(&self) -> Option<SystemTime> {
        self.node.load().as_ref().map(|n| n.refresh_at())
    }

    /// The node certificate's chain and when it was issued.
    pub fn node_chain(&self) -> Option<(SystemTime, Vec<CertificateDer<'static>>)> {
        self.node
            .load()
            .as_ref()
            .map(|n| (n.not_before, n.chain.clone()))
    }

    /// An SVID for the task `task_arn`, named by the issuer from what ECS says.
    pub async fn svid(&self, task_arn: &str) -> Result<Svid, RemoteError> {
        if let Attestation::TaskRole(cfg) = &self.cfg.attestation {
            return self.task_svid(cfg, task_arn).await;
        }
        self.ensure_node().await?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IdentityError::from)?;
        let body = SvidRequest {
            task_arn: task_arn.to_owned(),
            csr: csr(&key)?,
        };
        let issued = self.call(Call::Svid, &body).await?;
        let svid = self.accept(Call::Svid, &issued, key, Usage::Server)?;
        self.note(Call::Svid, "issued");
        Ok(svid.0)
    }

    /// Renews the node certificate when it is at or past half its life (or missing).
    pub async fn refresh_node(&self) -> Result<(), RemoteError> {
        if matches!(self.cfg.attestation, Attestation::TaskRole(_)) {
            return Ok(()); // no node certificate
        }
        if self
            .node_refresh_at()
            .is_none_or(|at| at <= SystemTime::now())
        {
            self.renew_node(true).await?;
        }
        Ok(())
    }

    /// A valid node certificate: the current one, a renewed one, or one from a fresh
    /// attestation when there is none or it expired.
    async fn ensure_node(&self) -> Result<(), RemoteError> {
        let now = SystemTime::now();
        match self.node.load().as_ref() {
            Some(n) if n.not_after > now => Ok(()),
            _ => self.renew_node(false).await,
        }
    }

    /// `due_only`: a refresh that another caller may already have done.
    async fn renew_node(&self, due_only: bool) -> Result<(), RemoteError> {
        let _guard = self.node_lock.lock().await;
        let now = SystemTime::now();
        let current = self.node.load_full();
        if let Some(n) = &current {
            let wanted = if due_only {
                n.refresh_at()
            } else {
                n.not_after
            };
            if wanted > now {
                return Ok(()); // done by the caller before us
            }
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IdentityError::from)?;
        let csr = csr(&key)?;
        let key_pem = key.serialize_pem();
        let issued = match &current {
            Some(n) if n.not_after > now => {
                self.call(Call::Node, &NodeRenewRequest { csr }).await?
            }
            _ => {
                let (document, signature) = self.instance_identity().await?;
                self.call(
                    Call::Attest,
                    &AttestRequest {
                        document,
                        signature,
                        csr,
                    },
                )
                .await?
            }
        };
        let call = if current.as_ref().is_some_and(|n| n.not_after > now) {
            Call::Node
        } else {
            Call::Attest
        };
        let (svid, chain_pem) = self.accept(call, &issued, key, Usage::Client)?;
        let id = &svid.id;
        if protocol::node_instance_of(id).is_none() {
            return Err(RemoteError::Protocol {
                call,
                message: format!("{id} is not a node certificate"),
            });
        }
        let dir = self.dir();
        super::create_private_dir(&dir)?;
        super::write_atomic(
            &dir.join(NODE_KEY_FILE),
            key_pem.as_bytes(),
            super::KEY_MODE,
        )?;
        super::write_atomic(
            &dir.join(NODE_CERT_FILE),
            chain_pem.as_bytes(),
            super::PUBLIC_MODE,
        )?;
        tracing::info!(identity = %id, serial = %svid.serial, call = call.as_str(), "node certificate issued");
        self.node.store(Some(Arc::new(NodeCert {
            certified: svid.certified_key(),
            chain: svid.chain.clone(),
            not_before: svid.not_before,
            not_after: svid.not_after,
        })));
        self.note(call, "issued");
        Ok(())
    }

    /// The instance identity document and its signature, from IMDS.
    async fn instance_identity(&self) -> Result<(String, String), RemoteError> {
        let Attestation::Instance { imds_url: url } = &self.cfg.attestation else {
            return Err(RemoteError::Imds {
                url: String::new(),
                message: "a sidecar attests with its task role, not IMDS".into(),
            });
        };
        let mut got = imds_get(
            url,
            &[
                "/latest/dynamic/instance-identity/document",
                "/latest/dynamic/instance-identity/signature",
            ],
        )
        .await
        .map_err(|message| RemoteError::Imds {
            url: url.to_string(),
            message,
        })?;
        let signature = got.pop().unwrap_or_default().trim().to_owned();
        let document = got.pop().unwrap_or_default();
        Ok((document, signature))
    }

    async fn call(&self, call: Call, body: &impl Serialize) -> Result<Issued, RemoteError> {
        let result = self.call_inner(call, body).await;
        if let Err(e) = &result {
            self.note(call, e.label());
        }
        result
    }

    async fn call_inner(&self, call: Call, body: &impl Serialize) -> Result<Issued, RemoteError> {
        let target = authority(&self.cfg.issuer_url)
            .map_err(|message| RemoteError::Unreachable { call, message })?;
        let expected = protocol::issuer_id(&self.cfg.trust_domain);
        let verifier = SpiffeServerVerifier::new(
            self.bundle.clone(),
            vec![self.cfg.trust_domain.clone()],
            expected.clone(),
        );
        let builder = rustls::ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut tls = if matches!(call, Call::Attest | Call::Task) {
            builder.with_no_client_auth()
        } else {
            let node = self.node.load_full().ok_or_else(|| RemoteError::Protocol {
                call,
                message: "no node certificate".into(),
            })?;
            builder.with_client_cert_resolver(Arc::new(NodeResolver(node.certified.clone())))
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let json = serde_json::to_vec(body).map_err(|e| RemoteError::Protocol {
            call,
            message: e.to_string(),
        })?;
        let (status, text) = http_call(
            &target,
            Some((Arc::new(tls), expected.sni())),
            http::Method::POST,
            call.path(),
            &[("content-type", "application/json")],
            Bytes::from(json),
        )
        .await
        .map_err(|message| RemoteError::Unreachable { call, message })?;
        if status == 200 {
            return serde_json::from_str(&text).map_err(|e| RemoteError::Protocol {
                call,
                message: format!("response: {e}"),
            });
        }
        match serde_json::from_str::<Refusal>(&text) {
            Ok(r) => Err(RemoteError::Refused {
                call,
                reason: Reason::parse(&r.error).unwrap_or(Reason::Internal),
                message: r.message,
            }),
            Err(_) => Err(RemoteError::Protocol {
                call,
                message: format!(
                    "HTTP {status}: {}",
                    text.chars().take(200).collect::<String>()
                ),
            }),
        }
    }
}

/// A PEM PKCS#10 request for `key` with no subject and no extensions: the issuer names the
/// certificate.
fn csr(key: &KeyPair) -> Result<String, IdentityError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    Ok(params.serialize_request(key)?.pem()?)
}

#[derive(Debug)]
struct NodeResolver(Arc<CertifiedKey>);

impl ResolvesClientCert for NodeResolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}
