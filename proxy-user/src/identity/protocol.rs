//! The wire protocol between node proxies and `ecsmesh issuer`: JSON over HTTP/1.1 over
//! TLS 1.3 (ring). One schema for both sides, so they cannot drift.
//!
//! - The issuer presents an X.509-SVID for [`issuer_id`] (`spiffe://<td>/ecsmesh/issuer`),
//!   issued by its own issuing CA; nodes verify it against the root bundle they were given
//!   out of band, never against anything the issuer sends.
//! - `POST /v1/attest` (no client certificate): [`AttestRequest`] → [`Issued`], a node
//!   certificate `spiffe://<td>/ecsmesh/node/<ec2-instance-id>` for the CSR's key.
//! - `POST /v1/node` (mTLS with the node certificate): [`NodeRenewRequest`] → [`Issued`],
//!   a fresh node certificate without a new attestation.
//! - `POST /v1/svid` (mTLS with the node certificate): [`SvidRequest`] → [`Issued`], an
//!   X.509-SVID for the task, named from what ECS says about it.
//! - `POST /v1/task` (no client certificate): [`TaskAttestRequest`] → [`Issued`], an
//!   X.509-SVID for a task that proves itself with its own IAM task role: a SigV4-signed
//!   `sts:GetCallerIdentity` (HashiCorp Vault's AWS IAM auth method) whose signed
//!   [`BINDING_HEADER`] ties it to this issuer and this CSR. The issuer sends it to STS
//!   itself; the caller is `assumed-role/<task role>/<task id>` (ECS names task-role
//!   sessions after the task), which ECS must confirm. Sidecars use this: no node, no key
//!   material in the task definition.
//! - Every refusal is a 4xx/5xx with [`Refusal`]: a stable `error` code ([`Reason`]) and a
//!   human message.
//!
//! Keys are made where they are used and never travel: every request carries a PKCS#10 CSR
//! (PEM) whose subject and extensions the issuer ignores except to refuse a CSR asking for
//! SANs or a CA flag.
use serde::{Deserialize, Serialize};

use super::{IdentityError, SpiffeId, TrustDomain};

pub const ATTEST_PATH: &str = "/v1/attest";
pub const NODE_PATH: &str = "/v1/node";
pub const SVID_PATH: &str = "/v1/svid";
pub const TASK_PATH: &str = "/v1/task";
/// The signed header binding a task's STS request to one issuer and one CSR.
pub const BINDING_HEADER: &str = "x-ecsmesh-binding";
/// The only STS request the issuer forwards.
pub const GET_CALLER_IDENTITY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
/// The largest request body the issuer reads (a CSR plus an instance identity document
/// and its signature fit in a few KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// The identity the issuer's TLS server certificate carries.
pub fn issuer_id(td: &TrustDomain) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{td}/ecsmesh/issuer"))
        .expect("a trust domain plus a fixed path is a SPIFFE ID")
}

/// The path prefix of node certificates; identities under `/ecsmesh/` are the mesh's own
/// and are never workload identities (refused on the tunnel port).
pub const RESERVED_PREFIX: &str = "/ecsmesh/";
pub const NODE_PREFIX: &str = "/ecsmesh/node/";

/// A node certificate's identity for an EC2 instance id (`i-…`).
pub fn node_id(td: &TrustDomain, ec2_instance_id: &str) -> Result<SpiffeId, IdentityError> {
    SpiffeId::parse(&format!("spiffe://{td}{NODE_PREFIX}{ec2_instance_id}"))
}

/// The EC2 instance id a node certificate names, if `id` is one.
pub fn node_instance_of(id: &SpiffeId) -> Option<&str> {
    id.path()
        .strip_prefix(NODE_PREFIX)
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
}

/// AWS's instance identity document as IMDS serves it, with the base64 RSA-SHA256
/// signature over its exact bytes (`/latest/dynamic/instance-identity/document` and
/// `/signature`): the aws_iid attestation of SPIRE.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttestRequest {
    pub document: String,
    pub signature: String,
    pub csr: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeRenewRequest {
    pub csr: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SvidRequest {
    /// The full task ARN as the ECS agent reports it.
    pub task_arn: String,
    pub csr: String,
}

/// `POST /v1/task`: a task's own proof, for an SVID for that task.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskAttestRequest {
    /// The full task ARN (from the task metadata endpoint).
    pub task_arn: String,
    pub csr: String,
    pub sts: SignedStsRequest,
}

/// A SigV4-signed `POST` of [`GET_CALLER_IDENTITY`] to STS, as the task signed it; the
/// issuer sends exactly this to its own configured STS endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignedStsRequest {
    pub url: String,
    /// Every header the signature covers (lowercase names), `host` included.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// The value of [`BINDING_HEADER`]: the issuer's identity and the SHA-256 of the CSR PEM
/// exactly as sent, so a captured request is worth nothing at another issuer or for
/// another key.
pub fn binding(issuer: &SpiffeId, csr_pem: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, csr_pem.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{issuer} sha256={hex}")
}

/// A certificate the issuer made for the CSR's key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Issued {
    pub spiffe_id: String,
    /// Leaf, then the issuing CA, PEM.
    pub chain: String,
}

/// The body of every refusal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Refusal {
    pub error: String,
    pub message: String,
}

/// Why the issuer refused: the `error` of a [`Refusal`], the `reason` label of
/// `ecsmesh_issuer_requests_total`, and a field of the issuer's log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The request is not JSON of the expected shape, or uses the wrong method or path.
    BadRequest,
    BodyTooLarge,
    /// The instance identity document does not parse or lacks fields.
    MalformedAttestation,
    /// The document's signature does not verify against any configured AWS certificate.
    ForgedAttestation,
    /// The instance already holds an unexpired node certificate from an earlier
    /// attestation: the same document again is a replay (renew over mTLS instead).
    ReplayedAttestation,
    /// The EC2 instance is not a container instance of the cluster.
    NotInCluster,
    /// The instance is on the deny list.
    DeniedInstance,
    /// `/v1/node` or `/v1/svid` without a client certificate.
    NoNodeCertificate,
    /// The client certificate does not verify (chain, validity, key usage).
    BadNodeCertificate,
    /// The client certificate belongs to another trust domain.
    ForeignTrustDomain,
    /// The client certificate is a valid SVID but not a node certificate.
    NotANodeCertificate,
    MalformedCsr,
    /// The CSR asks for subject alternative names: the issuer names certificates itself.
    CsrExtraSans,
    /// The CSR asks for a CA certificate.
    CsrCa,
    /// ECS does not know the task.
    UnknownTask,
    /// The task runs on another container instance than the requesting node.
    NotOnInstance,
    /// The task is not between PENDING and STOPPING (for example STOPPED).
    TaskNotRunning,
    /// The identity template needs a value ECS does not give for this task.
    NoIdentity,
    /// ECS could not be asked (retry later).
    EcsUnavailable,
    /// The signed STS request is bound to another issuer or another CSR (a replay).
    BindingMismatch,
    /// STS names a caller that is not the task's own role session.
    NotTaskCredentials,
    /// The task's definition has another task role than the caller's.
    RoleMismatch,
    /// STS could not be asked (retry later).
    StsUnavailable,
    Internal,
}

impl Reason {
    pub const ALL: [Reason; 24] = [
        Reason::BadRequest,
        Reason::BodyTooLarge,
        Reason::MalformedAttestation,
        Reason::ForgedAttestation,
        Reason::ReplayedAttestation,
        Reason::NotInCluster,
        Reason::DeniedInstance,
        Reason::NoNodeCertificate,
        Reason::BadNodeCertificate,
        Reason::ForeignTrustDomain,
        Reason::NotANodeCertificate,
        Reason::MalformedCsr,
        Reason::CsrExtraSans,
        Reason::CsrCa,
        Reason::UnknownTask,
        Reason::NotOnInstance,
        Reason::TaskNotRunning,
        Reason::NoIdentity,
        Reason::EcsUnavailable,
        Reason::BindingMismatch,
        Reason::NotTaskCredentials,
        Reason::RoleMismatch,
        Reason::StsUnavailable,
        Reason::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadRequest => "bad_request",
            Reason::BodyTooLarge => "body_too_large",
            Reason::MalformedAttestation => "malformed_attestation",
            Reason::ForgedAttestation => "forged_attestation",
            Reason::ReplayedAttestation => "replayed_attestation",
            Reason::NotInCluster => "not_in_cluster",
            Reason::DeniedInstance => "denied_instance",
            Reason::NoNodeCertificate => "no_node_certificate",
            Reason::BadNodeCertificate => "bad_node_certificate",
            Reason::ForeignTrustDomain => "foreign_trust_domain",
            Reason::NotANodeCertificate => "not_a_node_certificate",
            Reason::MalformedCsr => "malformed_csr",
            Reason::CsrExtraSans => "csr_extra_sans",
            Reason::CsrCa => "csr_ca",
            Reason::UnknownTask => "unknown_task",
            Reason::NotOnInstance => "not_on_instance",
            Reason::TaskNotRunning => "task_not_running",
            Reason::NoIdentity => "no_identity",
            Reason::EcsUnavailable => "ecs_unavailable",
            Reason::BindingMismatch => "binding_mismatch",
            Reason::NotTaskCredentials => "not_task_credentials",
            Reason::RoleMismatch => "role_mismatch",
            Reason::StsUnavailable => "sts_unavailable",
            Reason::Internal => "internal",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The HTTP status a refusal is sent with.
    pub fn status(self) -> u16 {
        match self {
            Reason::BadRequest | Reason::MalformedCsr | Reason::CsrExtraSans | Reason::CsrCa => 400,
            Reason::MalformedAttestation => 400,
            Reason::BodyTooLarge => 413,
            Reason::NoNodeCertificate => 401,
            Reason::UnknownTask => 404,
            Reason::EcsUnavailable | Reason::StsUnavailable => 503,
            Reason::Internal => 500,
            _ => 403,
        }
    }

    /// Whether asking again later can succeed without anything else changing.
    pub fn transient(self) -> bool {
        matches!(
            self,
            Reason::EcsUnavailable | Reason::StsUnavailable | Reason::Internal
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_and_node_ids_parse() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        let td = TrustDomain::new("mesh.test").unwrap();
        let id = node_id(&td, "i-0123456789abcdef0").unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://mesh.test/ecsmesh/node/i-0123456789abcdef0"
        );
        assert_eq!(node_instance_of(&id), Some("i-0123456789abcdef0"));
        assert_eq!(node_instance_of(&issuer_id(&td)), None);
    }
}
