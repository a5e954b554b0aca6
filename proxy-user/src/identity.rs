//! Workload identity for the mesh: SPIFFE IDs, a small file-based CA for operators and
//! tests, X.509-SVID verification as rustls verifiers, and the per-node manager that issues
//! and refreshes the SVIDs of the node's tasks.
//!
//! Everything here uses the ring `CryptoProvider` explicitly (see [`provider`]) so that the
//! crate never depends on, or installs, a process-wide default provider.
pub mod ca;
pub mod manager;
pub mod protocol;
pub mod remote;
pub mod spiffe;
pub mod trust;
pub mod verify;

#[cfg(test)]
pub(crate) mod tests;

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use rustls::crypto::CryptoProvider;

pub use ca::{Ca, Issuer, LeafSpec, Svid, TrustBundle};
pub use manager::{IdentityConfig, IdentityManager};
pub use spiffe::{DEFAULT_TEMPLATE, IdentityTemplate, SpiffeId, TemplateVars, TrustDomain};
pub use trust::{Fingerprint, TrustStatus};
pub use verify::{
    Rejection, SpiffeClientVerifier, SpiffeServerVerifier, Usage, peer_identity, rejection_of,
    rejection_of_io, verify_peer,
};

/// Everything that can go wrong while parsing identities, running the CA, or loading and
/// issuing certificates. Peer verification failures are [`Rejection`]s instead, because
/// they are a verdict about a peer, not a fault of this process.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid trust domain {input:?}: {reason}")]
    InvalidTrustDomain { input: String, reason: &'static str },
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    InvalidSpiffeId { input: String, reason: &'static str },
    #[error("invalid identity template {template:?}: {reason}")]
    InvalidTemplate { template: String, reason: String },
    #[error("identity template uses {{{name}}} but no value was given for it")]
    MissingTemplateValue { name: &'static str },
    #[error(
        "value {value:?} for {{{name}}} is not a SPIFFE path segment (letters, digits, '.', '-', '_')"
    )]
    InvalidTemplateValue { name: &'static str, value: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A PEM, certificate, key or state file (or in-memory input) that does not parse or
    /// does not fit together.
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{0}: a CA already exists there; refusing to overwrite it")]
    CaExists(PathBuf),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS key: {0}")]
    Tls(#[from] rustls::Error),
    #[error("SVID lifetime must be at least 1 s")]
    LifetimeTooShort,
    #[error("{id} is outside trust domain {expected} of this issuer")]
    ForeignTrustDomain { id: SpiffeId, expected: TrustDomain },
    #[error("issuer {issuer} does not chain to the trust bundle: {rejection}")]
    IssuerNotTrusted {
        issuer: SpiffeId,
        rejection: Box<Rejection>,
    },
    #[error("file watch: {0}")]
    Watch(#[from] notify::Error),
}

impl IdentityError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn invalid(what: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        Self::Invalid {
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// The ring provider every TLS object of this module is built with. Cached per process
/// only to avoid rebuilding its tables; it is never installed as the rustls default.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// File mode for anything holding a private key.
pub(crate) const KEY_MODE: u32 = 0o600;
/// File mode for certificates and bundles (public material).
pub(crate) const PUBLIC_MODE: u32 = 0o644;

/// Writes `contents` to a temporary file next to `path` and renames it over `path`, so a
/// proxy watching the directory never reads a half-written certificate or key. The
/// temporary file is created with `mode` from the start: a key is never world-readable,
/// not even for a moment.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| IdentityError::invalid(path.display(), "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` is filtered by the umask and ignored for an existing file: set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(IdentityError::io(path, e));
    }
    Ok(())
}

pub(crate) fn read_string(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|e| IdentityError::io(path, e))
}

/// Creates `dir` (and parents) if missing; a directory created here gets mode 0700 because
/// it is about to hold private keys.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| IdentityError::io(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| IdentityError::io(dir, e))
}

/// Certificate building blocks shared by the CA and the node issuer (rcgen, ECDSA P-256).
mod certgen {
    use std::{path::Path, time::Duration};

    use rcgen::KeyPair;
    use rustls_pki_types::CertificateDer;

    use super::{IdentityError, TrustDomain, verify::CertInfo};

    /// CA certificates start a little in the past: the CA host's clock and the nodes' clocks
    /// are not the same clock, and a fresh issuer must be usable everywhere at once.
    pub(crate) const CA_BACKDATE: Duration = Duration::from_secs(300);

    /// A CA certificate with its key, in the form rcgen signs with. rcgen (without its
    /// x509-parser feature) cannot load a certificate, so the signer is rebuilt from the
    /// subject name and key; the leaf's issuer name and authority key id come from exactly
    /// those, and [`Signer::from_parts`] checks the rebuilt name is byte-identical.
    pub(crate) struct Signer {
        rcgen: rcgen::Certificate,
        key: KeyPair,
    }

    impl Signer {
        pub(crate) fn from_parts(
            der: CertificateDer<'static>,
            key: KeyPair,
            what: &Path,
        ) -> Result<Self, IdentityError> {
            let bad = |r: &str| IdentityError::invalid(what.display(), r);
            let info = CertInfo::parse(&der).map_err(|r| bad(&r))?;
            if info.spki != key.public_key_der() {
                return Err(bad("private key does not belong to this certificate"));
            }
            let mut params = rcgen::CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            if let Some(cn) = &info.common_name {
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, cn.as_str());
            }
            if let Some(o) = &info.organization {
                params
                    .distinguished_name
                    .push(rcgen::DnType::OrganizationName, o.as_str());
            }
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            let rebuilt = params.self_signed(&key)?;
            let check = CertInfo::parse(rebuilt.der()).map_err(|r| bad(&r))?;
            if check.subject_raw != info.subject_raw {
                return Err(bad(
                    "subject name is not one this CA writes (CN and O only)",
                ));
            }
            Ok(Self {
                rcgen: rebuilt,
                key,
            })
        }

        /// Signs `params` for `key`: a key pair made here, or only the public key of one
        /// made elsewhere (a CSR's).
        pub(crate) fn sign(
            &self,
            params: rcgen::CertificateParams,
            key: &impl rcgen::PublicKeyData,
        ) -> Result<rcgen::Certificate, IdentityError> {
            Ok(params.signed_by(key, &self.rcgen, &self.key)?)
        }
    }

    pub(crate) fn ca_params(
        common_name: String,
        td: &TrustDomain,
        lifetime: Duration,
        path_len: Option<u8>,
    ) -> Result<rcgen::CertificateParams, IdentityError> {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, td.as_str());
        p.not_before = now_secs() - to_time(CA_BACKDATE)?;
        p.not_after = p.not_before + to_time(lifetime)?;
        p.serial_number = Some(random_serial()?);
        p.is_ca = rcgen::IsCa::Ca(match path_len {
            Some(n) => rcgen::BasicConstraints::Constrained(n),
            None => rcgen::BasicConstraints::Unconstrained,
        });
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        Ok(p)
    }

    pub(crate) fn leaf_params(
        uris: &[String],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<rcgen::CertificateParams, IdentityError> {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "ecsmesh svid");
        p.not_before = not_before;
        p.not_after = not_after;
        p.serial_number = Some(random_serial()?);
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.subject_alt_names = uris
            .iter()
            .map(|u| Ok(rcgen::SanType::URI(rcgen::Ia5String::try_from(u.as_str())?)))
            .collect::<Result<_, rcgen::Error>>()?;
        p.use_authority_key_identifier_extension = true;
        Ok(p)
    }

    /// 128 random bits, positive: serials must not repeat under one issuer, and a refreshed
    /// SVID must be told apart from the one it replaces.
    pub(crate) fn random_serial() -> Result<rcgen::SerialNumber, IdentityError> {
        let mut b = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .map_err(|_| IdentityError::invalid("serial number", "system RNG failed"))?;
        b[0] = (b[0] & 0x7f) | 0x40;
        Ok(rcgen::SerialNumber::from_slice(&b))
    }

    /// Now, cut to whole seconds: certificates store seconds, and a short lifetime must mean
    /// exactly that many seconds.
    pub(crate) fn now_secs() -> time::OffsetDateTime {
        let now = time::OffsetDateTime::now_utc();
        now - time::Duration::nanoseconds(i64::from(now.nanosecond()))
    }

    pub(crate) fn to_time(d: Duration) -> Result<time::Duration, IdentityError> {
        time::Duration::try_from(d).map_err(|e| IdentityError::invalid("duration", e))
    }

    /// The first certificate of a PEM text.
    pub(crate) fn first_cert(
        pem: &str,
        what: &str,
    ) -> Result<CertificateDer<'static>, IdentityError> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .ok_or_else(|| IdentityError::invalid(what, "no CERTIFICATE in PEM"))?
            .map_err(|e| IdentityError::invalid(what, e))
    }
}
