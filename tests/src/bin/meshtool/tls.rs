//! TLS plumbing shared by `tunnel`, `tls-server` and `raw`: rustls with the ring provider
//! built explicitly, TLS 1.3 only, ALPN h2, certificates from PEM files, and the two server
//! certificate checks the probes need (a SPIFFE identity against a bundle, or none at all).
use std::{fmt, path::Path, sync::Arc};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, OtherError,
    ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime, pem::PemObject,
};

pub const ALPN_H2: &[u8] = b"h2";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (leaf first for a chain file).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE in file", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A verifier error that shows our own message in the handshake error (rustls prints
/// `CertificateError::Other` with `{:?}`, hence the plain Debug).
struct Rejected(String);

impl fmt::Debug for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejected {}

fn rejected(msg: String) -> TlsError {
    TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Rejected(msg)))))
}

/// How the client checks the server's certificate.
#[derive(Debug)]
pub struct ServerCheck {
    algs: WebPkiSupportedAlgorithms,
    /// None: accept any certificate (handshake signatures are still verified).
    identity: Option<(Vec<TrustAnchor<'static>>, String)>,
}

impl ServerCheck {
    pub fn any(provider: &CryptoProvider) -> Self {
        Self {
            algs: provider.signature_verification_algorithms,
            identity: None,
        }
    }

    /// Chain must verify against the bundle's anchors and the leaf's only URI SAN must be
    /// `identity`.
    pub fn spiffe(
        provider: &CryptoProvider,
        bundle: &Path,
        identity: String,
    ) -> Result<Self, String> {
        let anchors = load_certs(bundle)?
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| format!("{}: trust anchor: {e:?}", bundle.display()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            algs: provider.signature_verification_algorithms,
            identity: Some((anchors, identity)),
        })
    }
}

/// The URI SANs of a certificate.
pub fn uri_sans(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("parse certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("subjectAltName: {e}"))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

impl ServerCertVerifier for ServerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let Some((anchors, identity)) = &self.identity else {
            return Ok(ServerCertVerified::assertion());
        };
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rejected(format!("leaf certificate: {e:?}")))?;
        ee.verify_for_usage(
            self.algs.all,
            anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rejected(format!("chain does not verify against the bundle: {e:?}")))?;
        let uris = uri_sans(end_entity).map_err(rejected)?;
        match uris.as_slice() {
            [one] if one == identity => Ok(ServerCertVerified::assertion()),
            [one] => Err(rejected(format!(
                "identity mismatch: server is {one}, expected {identity}"
            ))),
            _ => Err(rejected(format!(
                "server certificate has {} URI SANs ({uris:?}), expected exactly one",
                uris.len()
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// TLS 1.3 client config, ALPN h2, optional client certificate (chain file + key file).
pub fn client_config(
    check: ServerCheck,
    client_cert: Option<(&Path, &Path)>,
) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(check));
    let mut config = match client_cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(load_certs(chain)?, load_key(key)?)
            .map_err(|e| format!("client certificate: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// TLS 1.3 server config, ALPN h2, no client authentication.
pub fn server_config(chain: &Path, key: &Path) -> Result<ServerConfig, String> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(load_certs(chain)?, load_key(key)?)
        .map_err(|e| format!("server certificate: {e}"))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// SNI must be a DNS name (an IP literal would make rustls send no SNI at all).
pub fn dns_name(sni: &str) -> Result<ServerName<'static>, String> {
    match ServerName::try_from(sni.to_owned()) {
        Ok(name @ ServerName::DnsName(_)) => Ok(name),
        _ => Err(format!("--sni {sni:?}: not a DNS name")),
    }
}
