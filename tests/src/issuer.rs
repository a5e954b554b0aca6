//! Talking to `ecsmesh issuer` the way an attacker (or a curious operator) would: raw
//! HTTP/1.1 over TLS 1.3 from inside an instance's netns, with any client certificate or
//! none, and hand-made CSRs (well-formed, with SANs, with a CA flag, garbage).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the issuer listens, seen from the netns at `netns`.
#[derive(Clone, Debug)]
pub struct IssuerAddr {
    pub netns: PathBuf,
    pub addr: SocketAddr,
}

/// A client certificate chain and key, PEM files.
pub type ClientCert<'a> = (&'a Path, &'a Path);

impl IssuerAddr {
    /// `POST path` with `body`; returns (status, body). Status 0: no HTTP answer (the
    /// connection or handshake failed), with the error as body.
    pub fn post(&self, path: &str, body: &[u8], cert: Option<ClientCert<'_>>) -> (u16, String) {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: issuer\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut raw = head.into_bytes();
        raw.extend_from_slice(body);
        self.raw(raw, cert)
    }

    /// Sends `raw` bytes after the handshake and reads until the server closes.
    pub fn raw(&self, raw: Vec<u8>, cert: Option<ClientCert<'_>>) -> (u16, String) {
        let tls = client_config(cert);
        let addr = self.addr;
        crate::netns::run_at(&self.netns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let work = async {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let name = ServerName::try_from("issuer.ecsmesh.test").unwrap();
                    let mut s = tokio_rustls::TlsConnector::from(tls)
                        .connect(name, tcp)
                        .await?;
                    s.write_all(&raw).await?;
                    let mut out = Vec::new();
                    s.read_to_end(&mut out).await?;
                    Ok::<_, std::io::Error>(out)
                };
                match tokio::time::timeout(Duration::from_secs(30), work).await {
                    Ok(Ok(out)) => {
                        let text = String::from_utf8_lossy(&out).into_owned();
                        let status = text
                            .split_whitespace()
                            .nth(1)
                            .and_then(|c| c.parse().ok())
                            .unwrap_or(0);
                        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
                        (status, body.unwrap_or(text))
                    }
                    Ok(Err(e)) => (0, e.to_string()),
                    Err(_) => (0, "timed out".into()),
                }
            })
        })
    }

    /// The `error` code of a refusal body.
    pub fn reason(body: &str) -> String {
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("<not a refusal: {body}>"))
    }
}

fn client_config(cert: Option<ClientCert<'_>>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut cfg = match cert {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(chain)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// The attacker does not care who the server is.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What to put in a hand-made CSR.
#[derive(Clone, Copy, Debug, Default)]
pub struct CsrSpec<'a> {
    pub san_uri: Option<&'a str>,
    pub ca: bool,
}

/// A PEM CSR for a fresh P-256 key, and that key (PEM).
pub fn csr(spec: CsrSpec<'_>) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(uri) = spec.san_uri {
        p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    }
    if spec.ca {
        // rcgen will not put `is_ca` in a CSR: basicConstraints {cA TRUE} by hand.
        let mut ext = rcgen::CustomExtension::from_oid_content(
            &[2, 5, 29, 19],
            vec![0x30, 0x03, 0x01, 0x01, 0xff],
        );
        ext.set_criticality(true);
        p.custom_extensions = vec![ext];
    }
    (
        p.serialize_request(&key).unwrap().pem().unwrap(),
        key.serialize_pem(),
    )
}
