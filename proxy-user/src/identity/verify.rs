//! X.509-SVID verification: the chain to the trust bundle (rustls-webpki), then the SPIFFE
//! rules webpki does not know (exactly one `spiffe://` URI SAN, allowed trust domain, leaf
//! key usage), wrapped as rustls client and server verifiers.
//!
//! A failure is a [`Rejection`] with a stable `reason()` label for metrics; inside rustls it
//! travels as `CertificateError::Other` so [`rejection_of`] can recover it from a failed
//! handshake.
use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use rustls::{
    CertificateError, DistinguishedName, OtherError,
    client::danger::{ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::{IdentityError, SpiffeId, TrustDomain, read_string};

/// The handshake-signature half of a rustls verifier, the same for every verifier here:
/// the provider's algorithms (`self.algs`) check the peer's signature; what differs
/// between verifiers is how the certificate itself is judged.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}
pub(crate) use handshake_signatures;

/// Why a peer certificate was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("certificate does not chain to a trusted anchor ({0})")]
    UnknownCa(String),
    #[error("certificate (or its issuer) has expired")]
    Expired,
    #[error("certificate (or its issuer) is not valid yet")]
    NotYetValid,
    #[error("certificate has no URI SAN")]
    NoUriSan,
    #[error("certificate has {0} URI SANs; an SVID has exactly one")]
    MultipleUriSans(usize),
    #[error("URI SAN {0:?} is not a SPIFFE ID")]
    NotSpiffe(String),
    #[error("trust domain of {0} is not allowed")]
    TrustDomain(SpiffeId),
    #[error("key usage: {0}")]
    KeyUsage(String),
    #[error("peer is {got}, expected {expected}")]
    IdentityMismatch { expected: SpiffeId, got: SpiffeId },
    #[error("malformed certificate: {0}")]
    BadCertificate(String),
    #[error("{0} is signed directly by a trust anchor; SVIDs are issued by an issuing CA")]
    IssuedByAnchor(SpiffeId),
    #[error("{id} chains to an anchor of trust domain {anchor}")]
    AnchorDomain { id: SpiffeId, anchor: String },
    #[error("{0} is one of the mesh's own identities (node or issuer), never a workload's")]
    MeshIdentity(SpiffeId),
}

impl Rejection {
    /// Stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NoCertificate => "no_certificate",
            Rejection::UnknownCa(_) => "unknown_ca",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::NoUriSan => "no_uri_san",
            Rejection::MultipleUriSans(_) => "multiple_uri_sans",
            Rejection::NotSpiffe(_) => "not_spiffe",
            Rejection::TrustDomain(_) => "trust_domain",
            Rejection::KeyUsage(_) => "key_usage",
            Rejection::IdentityMismatch { .. } => "identity_mismatch",
            Rejection::BadCertificate(_) => "bad_certificate",
            Rejection::IssuedByAnchor(_) => "issued_by_anchor",
            Rejection::AnchorDomain { .. } => "anchor_trust_domain",
            Rejection::MeshIdentity(_) => "mesh_identity",
        }
    }

    fn into_tls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }

    fn from_webpki(e: webpki::Error) -> Self {
        use webpki::Error as E;
        match e {
            E::CertExpired { .. } => Rejection::Expired,
            E::CertNotValidYet { .. } => Rejection::NotYetValid,
            E::CaUsedAsEndEntity
            | E::EndEntityUsedAsCa
            | E::EmptyEkuExtension
            | E::RequiredEkuNotFoundContext(_) => Rejection::KeyUsage(format!("{e:?}")),
            E::BadDer
            | E::BadDerTime
            | E::ExtensionValueInvalid
            | E::InvalidCertValidity
            | E::InvalidSerialNumber
            | E::MalformedExtensions
            | E::TrailingData(_)
            | E::UnsupportedCertVersion
            | E::UnsupportedCriticalExtension => Rejection::BadCertificate(format!("{e:?}")),
            // Unknown issuer, bad signature, path constraints...: no trusted chain.
            other => Rejection::UnknownCa(format!("{other:?}")),
        }
    }
}

/// The anchors a node trusts; may hold several during a rotation.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    /// The trust domain each anchor speaks for (same order as `anchors`): its
    /// `spiffe://<td>` URI SAN, else its Organization (what `ecsmesh ca init` writes);
    /// `None` when it names none — then nothing chained to it is accepted.
    domains: Vec<Option<TrustDomain>>,
}

impl TrustBundle {
    pub fn load(path: &std::path::Path) -> Result<TrustBundle, IdentityError> {
        Self::parse(&read_string(path)?, &path.display().to_string())
    }

    pub fn from_pem(pem: &str) -> Result<TrustBundle, IdentityError> {
        Self::parse(pem, "trust bundle")
    }

    fn parse(pem: &str, what: &str) -> Result<TrustBundle, IdentityError> {
        use rustls_pki_types::pem::PemObject;
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IdentityError::invalid(what, e))?;
        if certs.is_empty() {
            return Err(IdentityError::invalid(what, "no CERTIFICATE in PEM"));
        }
        Self::build(certs, what)
    }

    /// A bundle of exactly these anchors.
    pub fn from_certificates(
        certs: Vec<CertificateDer<'static>>,
    ) -> Result<TrustBundle, IdentityError> {
        Self::build(certs, "trust bundle")
    }

    fn build(
        certs: Vec<CertificateDer<'static>>,
        what: &str,
    ) -> Result<TrustBundle, IdentityError> {
        let anchors = certs
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IdentityError::invalid(what, format!("{e:?}")))?;
        let domains = certs.iter().map(|c| anchor_domain(c)).collect();
        Ok(TrustBundle {
            certs,
            anchors,
            domains,
        })
    }

    /// The trust domain of the anchor a verified path ended at.
    fn domain_of(&self, anchor: &TrustAnchor<'_>) -> Option<&TrustDomain> {
        let i = self.anchors.iter().position(|a| {
            a.subject.as_ref() == anchor.subject.as_ref()
                && a.subject_public_key_info.as_ref() == anchor.subject_public_key_info.as_ref()
        })?;
        self.domains[i].as_ref()
    }

    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }
}

/// Which side of a handshake the peer is; decides the extended key usage required.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Client,
    Server,
}

/// Verifies a peer's X.509-SVID and returns its SPIFFE ID.
pub fn verify_peer(
    bundle: &TrustBundle,
    allowed: &[TrustDomain],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<SpiffeId, Rejection> {
    let ee = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| Rejection::BadCertificate(format!("{e:?}")))?;
    let eku = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    let algs = super::provider().signature_verification_algorithms.all;
    let path = ee
        .verify_for_usage(algs, bundle.anchors(), intermediates, now, eku, None, None)
        .map_err(Rejection::from_webpki)?;
    let info = CertInfo::parse(end_entity).map_err(Rejection::BadCertificate)?;
    let id = info.spiffe_id()?;
    match info.key_usage {
        Some(ku) if ku.digital_signature && !ku.key_cert_sign && !ku.crl_sign => {}
        Some(_) => {
            return Err(Rejection::KeyUsage(
                "an SVID needs digitalSignature and no keyCertSign/cRLSign".into(),
            ));
        }
        None => return Err(Rejection::KeyUsage("no keyUsage extension".into())),
    }
    if !allowed.contains(id.trust_domain()) {
        return Err(Rejection::TrustDomain(id));
    }
    // Only an issuing CA signs SVIDs: the root stays offline, and a leaf signed by it
    // directly is not one ecsmesh issued.
    if path.intermediate_certificates().next().is_none() {
        return Err(Rejection::IssuedByAnchor(id));
    }
    // An anchor signs only for its own trust domain: a federated anchor cannot vouch
    // for identities of ours.
    match bundle.domain_of(path.anchor()) {
        Some(td) if td == id.trust_domain() => Ok(id),
        other => Err(Rejection::AnchorDomain {
            anchor: other.map_or_else(|| "(none named)".to_owned(), ToString::to_string),
            id,
        }),
    }
}

/// The trust domain an anchor certificate names: a `spiffe://<td>` URI SAN (as SPIFFE
/// CA certificates carry), else its Organization.
fn anchor_domain(cert: &CertificateDer<'_>) -> Option<TrustDomain> {
    let info = CertInfo::parse(cert).ok()?;
    let from_uri = info.uris.iter().find_map(|u| {
        let td = u.strip_prefix("spiffe://")?;
        td.parse::<TrustDomain>().ok()
    });
    from_uri.or_else(|| info.organization.as_deref()?.parse().ok())
}

/// The SPIFFE ID in the first certificate (the peer's leaf), without verifying anything:
/// for labelling a connection whose handshake already verified it.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    CertInfo::parse(certs.first()?).ok()?.spiffe_id().ok()
}

/// The [`Rejection`] inside a rustls error made by this module's verifiers (or
/// [`Rejection::NoCertificate`] when rustls itself found the peer sent none).
pub fn rejection_of(err: &rustls::Error) -> Option<Rejection> {
    match err {
        rustls::Error::NoCertificatesPresented => Some(Rejection::NoCertificate),
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => {
            e.downcast_ref::<Rejection>().cloned()
        }
        _ => None,
    }
}

/// The [`Rejection`] inside an I/O error from a tokio-rustls handshake.
pub fn rejection_of_io(err: &std::io::Error) -> Option<Rejection> {
    rejection_of(err.get_ref()?.downcast_ref::<rustls::Error>()?)
}

/// Verifies client SVIDs on the server side of the mesh tunnel. The bundle is read on
/// every handshake so a reloaded bundle applies to the next connection.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: Arc<ArcSwap<TrustBundle>>,
    allowed: Vec<TrustDomain>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: Arc<ArcSwap<TrustBundle>>, allowed: Vec<TrustDomain>) -> Arc<Self> {
        Arc::new(Self {
            bundle,
            allowed,
            algs: super::provider().signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bundle = self.bundle.load();
        verify_peer(
            &bundle,
            &self.allowed,
            end_entity,
            intermediates,
            now,
            Usage::Client,
        )
        .and_then(|id| {
            // A node certificate authenticates a node to the issuer, nothing else: a
            // stolen one must not pass for a workload on the tunnel port.
            if id.path().starts_with(super::protocol::RESERVED_PREFIX) {
                Err(Rejection::MeshIdentity(id))
            } else {
                Ok(id)
            }
        })
        .map(|_| ClientCertVerified::assertion())
        .map_err(Rejection::into_tls)
    }

    handshake_signatures!();
}

/// Verifies the server SVID on the client side: chain, SPIFFE rules, and that the server
/// is exactly the identity the client meant to reach. The TLS server name is ignored: it
/// is only the selector ([`SpiffeId::sni`]) that made the server pick an SVID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Arc<ArcSwap<TrustBundle>>,
    allowed: Vec<TrustDomain>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(
        bundle: Arc<ArcSwap<TrustBundle>>,
        allowed: Vec<TrustDomain>,
        expected: SpiffeId,
    ) -> Arc<Self> {
        Arc::new(Self {
            bundle,
            allowed,
            expected,
            algs: super::provider().signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundle = self.bundle.load();
        let got = verify_peer(
            &bundle,
            &self.allowed,
            end_entity,
            intermediates,
            now,
            Usage::Server,
        )
        .map_err(Rejection::into_tls)?;
        if got != self.expected {
            return Err(Rejection::IdentityMismatch {
                expected: self.expected.clone(),
                got,
            }
            .into_tls());
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Key usage bits of a certificate that has the extension.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyUsageBits {
    pub digital_signature: bool,
    pub key_cert_sign: bool,
    pub crl_sign: bool,
}

/// What this module reads from a certificate with x509-parser.
#[derive(Clone, Debug)]
pub(crate) struct CertInfo {
    pub uris: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Lowercase hex, no separators.
    pub serial: String,
    /// DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// DER subject name.
    pub subject_raw: Vec<u8>,
    pub common_name: Option<String>,
    pub organization: Option<String>,
    pub key_usage: Option<KeyUsageBits>,
}

impl CertInfo {
    pub(crate) fn parse(der: &[u8]) -> Result<CertInfo, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let uris = match cert.subject_alternative_name().map_err(|e| e.to_string())? {
            Some(san) => san
                .value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect(),
            None => Vec::new(),
        };
        let key_usage = cert
            .key_usage()
            .map_err(|e| e.to_string())?
            .map(|ku| KeyUsageBits {
                digital_signature: ku.value.digital_signature(),
                key_cert_sign: ku.value.key_cert_sign(),
                crl_sign: ku.value.crl_sign(),
            });
        let subject = cert.subject();
        Ok(CertInfo {
            uris,
            not_before: system_time(cert.validity().not_before.timestamp()),
            not_after: system_time(cert.validity().not_after.timestamp()),
            serial: cert
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            spki: cert.public_key().raw.to_vec(),
            subject_raw: subject.as_raw().to_vec(),
            common_name: subject
                .iter_common_name()
                .next()
                .and_then(|a| a.as_str().ok())
                .map(str::to_owned),
            organization: subject
                .iter_organization()
                .next()
                .and_then(|a| a.as_str().ok())
                .map(str::to_owned),
            key_usage,
        })
    }

    /// The single SPIFFE URI SAN, per the X.509-SVID rules.
    pub(crate) fn spiffe_id(&self) -> Result<SpiffeId, Rejection> {
        match self.uris.as_slice() {
            [] => Err(Rejection::NoUriSan),
            [uri] => SpiffeId::parse(uri).map_err(|_| Rejection::NotSpiffe(uri.clone())),
            more => Err(Rejection::MultipleUriSans(more.len())),
        }
    }
}

fn system_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}
