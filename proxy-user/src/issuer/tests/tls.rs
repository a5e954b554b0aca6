//! The real TLS server on loopback, with real rustls clients.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use rustls::{ClientConfig, pki_types::PrivateKeyDer};
use rustls_pki_types::{PrivatePkcs8KeyDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::{
    identity::{
        DEFAULT_TEMPLATE, SpiffeServerVerifier,
        protocol::{ATTEST_PATH, MAX_BODY, NODE_PATH, Refusal, SVID_PATH, issuer_id},
    },
    issuer::{
        metrics::{Endpoint, IssuerMetrics},
        server::{self, App},
    },
};

struct Running {
    addr: SocketAddr,
    bundle: TrustBundle,
    td: TrustDomain,
    metrics: Arc<IssuerMetrics>,
    shutdown: CancellationToken,
    /// The fixture's scratch directory (the CA the app loads): removed with the server.
    _tmp: super::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts the server for `f` (its bundle extended with `extra_anchors`).
async fn start(f: Fixture, extra_anchors: &str) -> (Running, Arc<App>) {
    let issuer_dir = f.tmp.path().join("issuer");
    let pem = std::fs::read_to_string(issuer_dir.join("bundle.pem")).unwrap() + extra_anchors;
    let bundle = TrustBundle::from_pem(&pem).unwrap();
    f.authority
        .replace(Issuer::load(&issuer_dir).unwrap(), bundle)
        .unwrap();
    let client_bundle = TrustBundle::load(&issuer_dir.join("bundle.pem")).unwrap();
    let td = f.td.clone();
    let tls = server::tls_config(f.authority.clone()).unwrap();
    let metrics = Arc::new(IssuerMetrics::default());
    let app = Arc::new(App {
        service: f.service,
        metrics: metrics.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(server::serve(listener, tls, app.clone(), shutdown.clone()));
    (
        Running {
            addr,
            bundle: client_bundle,
            td,
            metrics,
            shutdown,
            _tmp: f.tmp,
        },
        app,
    )
}

impl Running {
    fn client(&self, cert: Option<(&str, &rcgen::KeyPair)>) -> tokio_rustls::TlsConnector {
        let verifier = SpiffeServerVerifier::new(
            Arc::new(ArcSwap::from_pointee(self.bundle.clone())),
            vec![self.td.clone()],
            issuer_id(&self.td),
        );
        let builder = ClientConfig::builder_with_provider(crate::identity::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match cert {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));
                builder.with_client_auth_cert(certs(chain), key).unwrap()
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// One POST; returns the status and the body.
    async fn post(
        &self,
        cert: Option<(&str, &rcgen::KeyPair)>,
        path: &str,
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        self.post_as(cert, path, body, false).await
    }

    /// One POST, with a content-length or chunked.
    async fn post_as(
        &self,
        cert: Option<(&str, &rcgen::KeyPair)>,
        path: &str,
        body: &[u8],
        chunked: bool,
    ) -> (u16, Vec<u8>) {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = ServerName::try_from("issuer.ecsmesh.internal").unwrap();
        let mut tls = self.client(cert).connect(name, tcp).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: issuer\r\ncontent-type: application/json\r\n{}\r\n",
            if chunked {
                "transfer-encoding: chunked\r\n".to_owned()
            } else {
                format!("content-length: {}\r\n", body.len())
            }
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        if chunked {
            for c in body.chunks(4096) {
                tls.write_all(format!("{:x}\r\n", c.len()).as_bytes())
                    .await
                    .unwrap();
                tls.write_all(c).await.unwrap();
                tls.write_all(b"\r\n").await.unwrap();
            }
            tls.write_all(b"0\r\n\r\n").await.unwrap();
        } else {
            tls.write_all(body).await.unwrap();
        }
        tls.flush().await.unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out);
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
        let start = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        (status, out[start..].to_vec())
    }

    async fn refusal(
        &self,
        cert: Option<(&str, &rcgen::KeyPair)>,
        path: &str,
        body: &impl serde::Serialize,
    ) -> (u16, String) {
        let (status, body) = self
            .post(cert, path, &serde_json::to_vec(body).unwrap())
            .await;
        let r: Refusal = serde_json::from_slice(&body).unwrap();
        (status, r.error)
    }
}

#[tokio::test]
async fn attest_then_svid_over_mtls_and_refusals_with_their_reasons() {
    // A second trust domain whose anchor the issuer's bundle also holds (federation):
    // its node certificates chain, but to another trust domain.
    let other_tmp = TempDir::new("other");
    let other_td = TrustDomain::new("other.test").unwrap();
    let mut other = Ca::init(&other_tmp.path().join("ca"), other_td).unwrap();
    other
        .issue_intermediate("x", &other_tmp.path().join("x"))
        .unwrap();
    let other_anchor = std::fs::read_to_string(other.bundle_path()).unwrap();

    let f = Fixture::new(DEFAULT_TEMPLATE);
    // A workload SVID of the issuer's own CA, with a key the client holds.
    let workload_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let workload_id = crate::identity::SpiffeId::parse("spiffe://mesh.test/ecs/prod/web").unwrap();
    let workload = pem_chain(
        &f.authority
            .issuer()
            .issue_for_key(&workload_id, &workload_key, HOUR)
            .unwrap(),
    );
    let (run, _app) = start(f, &other_anchor).await;

    // Attest without a client certificate.
    let (csr, node_key) = csr_and_key();
    let doc = document(INSTANCE);
    let (status, body) = run
        .post(
            None,
            ATTEST_PATH,
            &serde_json::to_vec(&attest_request(&doc, csr)).unwrap(),
        )
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let node: Issued = serde_json::from_slice(&body).unwrap();

    // SVID with the node certificate.
    let svid = SvidRequest {
        task_arn: TASK_ARN.into(),
        csr: csr_and_key().0,
    };
    let (status, body) = run
        .post(
            Some((&node.chain, &node_key)),
            SVID_PATH,
            &serde_json::to_vec(&svid).unwrap(),
        )
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let issued: Issued = serde_json::from_slice(&body).unwrap();
    assert_eq!(issued.spiffe_id, "spiffe://mesh.test/ecs/prod/web");

    // No client certificate.
    assert_eq!(
        run.refusal(None, SVID_PATH, &svid).await,
        (401, "no_node_certificate".into())
    );
    // A node certificate of the other trust domain.
    let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let other_issuer = Issuer::load(&other_tmp.path().join("x")).unwrap();
    let other_node =
        crate::identity::protocol::node_id(other_issuer.instance_id().trust_domain(), INSTANCE)
            .unwrap();
    let other_chain = pem_chain(
        &other_issuer
            .issue_for_key(&other_node, &other_key, HOUR)
            .unwrap(),
    );
    assert_eq!(
        run.refusal(Some((&other_chain, &other_key)), SVID_PATH, &svid)
            .await,
        (403, "foreign_trust_domain".into())
    );
    // A workload SVID is not a node certificate.
    assert_eq!(
        run.refusal(Some((&workload, &workload_key)), SVID_PATH, &svid)
            .await,
        (403, "not_a_node_certificate".into())
    );

    // An oversized body: 413, and the server still answers.
    let big = vec![b' '; MAX_BODY + 1];
    let (status, body) = run.post(None, ATTEST_PATH, &big).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    // Several MiB, written before reading: the client still gets its 413.
    let huge = vec![b'x'; 4 << 20];
    let (status, _) = run.post(None, NODE_PATH, &huge).await;
    assert_eq!(status, 413);
    // The same without a declared length: cut off while streaming.
    let (status, body) = run.post_as(None, ATTEST_PATH, &big, true).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    let renew = serde_json::json!({ "csr": csr_and_key().0 });
    assert_eq!(
        run.refusal(None, NODE_PATH, &renew).await,
        (401, "no_node_certificate".into())
    );
    assert_eq!(run.metrics.count(Endpoint::Svid, "issued"), 1);
    assert_eq!(run.metrics.count(Endpoint::Attest, "body_too_large"), 2);
    assert!(run.metrics.encode().contains(
        "ecsmesh_issuer_requests_total{endpoint=\"svid\",result=\"foreign_trust_domain\"} 1"
    ));
}

#[tokio::test]
async fn silent_clients_do_not_block_others() {
    let f = Fixture::new(DEFAULT_TEMPLATE);
    let (run, _app) = start(f, "").await;
    // Connections that never start a handshake, and one that stops after TCP.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(run.addr).await.unwrap());
    }
    let (status, _) = tokio::time::timeout(
        Duration::from_secs(5),
        run.post(None, ATTEST_PATH, b"not json"),
    )
    .await
    .expect("a silent client blocked the server");
    assert_eq!(status, 400);
    drop(idle);
}

fn pem_chain(chain: &[rustls_pki_types::CertificateDer<'static>]) -> String {
    chain
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect()
}

/// Presents a fixed certificate chain with whatever key it is given (rustls' own
/// `with_client_auth_cert` refuses a key that does not match).
#[derive(Debug)]
struct Stolen(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Stolen {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn a_node_certificate_without_its_key_gets_no_handshake() {
    let f = Fixture::new(DEFAULT_TEMPLATE);
    let (node, _node_key) = f.attest().await.unwrap();
    let (run, _app) = start(f, "").await;
    let thief_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let signing = crate::identity::provider()
        .key_provider
        .load_private_key(PrivateKeyDer::from(PrivatePkcs8KeyDer::from(
            thief_key.serialize_der(),
        )))
        .unwrap();
    let stolen = Stolen(Arc::new(rustls::sign::CertifiedKey::new(
        certs(&node.chain),
        signing,
    )));
    let verifier = SpiffeServerVerifier::new(
        Arc::new(ArcSwap::from_pointee(run.bundle.clone())),
        vec![run.td.clone()],
        issuer_id(&run.td),
    );
    let config = ClientConfig::builder_with_provider(crate::identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(stolen));
    let tcp = TcpStream::connect(run.addr).await.unwrap();
    let name = ServerName::try_from("issuer.ecsmesh.internal").unwrap();
    let outcome = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        // TLS 1.3: the client finishes first; the server's verdict arrives as an alert.
        tls.write_all(b"POST /v1/svid HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}")
            .await?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    }
    .await;
    match outcome {
        Err(e) => assert!(
            e.to_string().contains("DecryptError") || e.to_string().contains("alert"),
            "{e}"
        ),
        Ok(out) => panic!("the server answered: {}", String::from_utf8_lossy(&out)),
    }
    assert_eq!(run.metrics.count(Endpoint::Svid, "issued"), 0);
}
