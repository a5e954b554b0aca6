//! The manager's rustls side: tunnel server and client configs, and the resolvers that
//! pick the SVID for each handshake from the current table.
use std::sync::Arc;

use rustls::{
    SignatureScheme,
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::IdentityManager;
use crate::identity::{SpiffeClientVerifier, SpiffeId, SpiffeServerVerifier};

impl IdentityManager {
    /// Server side of the tunnel: TLS 1.3, ring, mandatory SPIFFE client auth, SVID chosen
    /// by SNI, ALPN h2.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let verifier = SpiffeClientVerifier::new(self.bundle.clone(), self.allowed.clone());
        let mut cfg = rustls::ServerConfig::builder_with_provider(crate::identity::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.server_cert_resolver());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }

    /// Client side of the tunnel from `source` to `expected`: TLS 1.3, ring, the server must
    /// be exactly `expected`, ALPN h2. Connect with server name `expected.sni()`.
    pub fn client_config(
        self: &Arc<Self>,
        source: SpiffeId,
        expected: SpiffeId,
    ) -> Arc<rustls::ClientConfig> {
        let verifier =
            SpiffeServerVerifier::new(self.bundle.clone(), self.allowed.clone(), expected);
        let mut cfg = rustls::ClientConfig::builder_with_provider(crate::identity::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(self.client_cert_resolver(source));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }

    pub fn server_cert_resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(ServerResolver(self.clone()))
    }

    pub fn client_cert_resolver(self: &Arc<Self>, source: SpiffeId) -> Arc<dyn ResolvesClientCert> {
        Arc::new(ClientResolver {
            manager: self.clone(),
            source,
        })
    }
}

#[derive(Debug)]
struct ServerResolver(Arc<IdentityManager>);

impl ResolvesServerCert for ServerResolver {
    /// The SVID whose `sni()` the client asked for; none (handshake fails) otherwise, so a
    /// node never presents some other task's identity.
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.0.read();
        let id = table.by_sni.get(hello.server_name()?)?;
        table.by_id.get(id).map(|s| s.certified_key())
    }
}

#[derive(Debug)]
struct ClientResolver {
    manager: Arc<IdentityManager>,
    source: SpiffeId,
}

impl ResolvesClientCert for ClientResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.manager
            .current(&self.source)
            .map(|s| s.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
