use std::{sync::Arc, time::Duration};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::Pki;
use crate::identity::{
    IdentityConfig, IdentityManager, Rejection, SpiffeId, peer_identity, rejection_of,
    rejection_of_io,
};

const HOUR: Duration = Duration::from_secs(3600);

type Pair = (
    std::io::Result<client::TlsStream<DuplexStream>>,
    std::io::Result<server::TlsStream<DuplexStream>>,
);

/// One handshake over an in-memory pipe: `client` (as `source`, expecting `expected`,
/// asking for `sni`) against `server`.
async fn handshake(
    client: &Arc<IdentityManager>,
    source: &SpiffeId,
    expected: &SpiffeId,
    sni: &SpiffeId,
    server: &Arc<IdentityManager>,
) -> Pair {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let connector = TlsConnector::from(client.client_config(source.clone(), expected.clone()));
    let acceptor = TlsAcceptor::from(server.server_config());
    let name = ServerName::try_from(sni.sni()).unwrap();
    let (c, s) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(connector.connect(name, c), acceptor.accept(s))
    })
    .await
    .expect("handshake hung");
    (c, s)
}

#[tokio::test]
async fn mutual_tls_succeeds_and_each_side_sees_the_other_identity() {
    let pki = Pki::new("example.org");
    let m = pki.manager(HOUR);
    let client_id = pki.id("/ecs/prod/client");
    let server_id = pki.id("/ecs/prod/server");
    m.ensure(&client_id).unwrap();
    m.ensure(&server_id).unwrap();

    let (c, s) = handshake(&m, &client_id, &server_id, &server_id, &m).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    let server_conn = s.get_ref().1;
    assert_eq!(
        server_conn.peer_certificates().and_then(peer_identity),
        Some(client_id.clone())
    );
    assert_eq!(server_conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        server_conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        c.get_ref().1.peer_certificates().and_then(peer_identity),
        Some(server_id.clone())
    );
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // A refresh applies to new handshakes; the open session keeps working.
    let old_serial = m.current(&client_id).unwrap().serial.clone();
    m.reload().unwrap();
    let new_serial = m.current(&client_id).unwrap().serial.clone();
    assert_ne!(new_serial, old_serial);
    let (_c2, s2) = handshake(&m, &client_id, &server_id, &server_id, &m).await;
    let s2 = s2.unwrap();
    let presented = &s2.get_ref().1.peer_certificates().unwrap()[0];
    assert_eq!(presented, &m.current(&client_id).unwrap().chain[0]);
    s.write_all(b"pong").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    let pki = Pki::new("example.org");
    let m = pki.manager(HOUR);
    let client_id = pki.id("/ecs/prod/client");
    let server_id = pki.id("/ecs/prod/server");
    let wanted = pki.id("/ecs/prod/payments");
    m.ensure(&client_id).unwrap();
    m.ensure(&server_id).unwrap();

    // The client asks for server_id's SNI but means to reach `wanted`.
    let (c, s) = handshake(&m, &client_id, &wanted, &server_id, &m).await;
    let err = c.expect_err("client accepted the wrong server");
    let rejection = rejection_of_io(&err).expect("no rejection in the error");
    assert_eq!(
        rejection,
        Rejection::IdentityMismatch {
            expected: wanted,
            got: server_id,
        }
    );
    assert_eq!(rejection.reason(), "identity_mismatch");
    let tls = err
        .get_ref()
        .unwrap()
        .downcast_ref::<rustls::Error>()
        .unwrap();
    assert_eq!(rejection_of(tls), Some(rejection));
    assert!(s.is_err());
}

#[tokio::test]
async fn server_refuses_a_client_of_another_ca() {
    let pki = Pki::new("example.org");
    let stranger = Pki::new("example.org");
    let server = pki.manager(HOUR);
    // The stranger trusts both anchors, so it is the server that has to say no.
    let both = stranger.tmp.path().join("both.pem");
    let pem = |p: &Pki| std::fs::read_to_string(p.node.join("bundle.pem")).unwrap();
    std::fs::write(&both, pem(&stranger) + &pem(&pki)).unwrap();
    let client = IdentityManager::new(IdentityConfig {
        bundle: both,
        source: crate::identity::manager::SvidSource::IssuerDir(stranger.node.clone()),
        svid_lifetime: HOUR,
        allowed_trust_domains: vec![],
    })
    .unwrap();
    let client_id = stranger.id("/ecs/prod/client");
    let server_id = pki.id("/ecs/prod/server");
    client.ensure(&client_id).unwrap();
    server.ensure(&server_id).unwrap();

    let (c, s) = handshake(&client, &client_id, &server_id, &server_id, &server).await;
    // TLS 1.3: the client is done before the server has checked its certificate.
    drop(c);
    let err = s.expect_err("server accepted a stranger");
    assert_eq!(
        rejection_of_io(&err).map(|r| r.reason()),
        Some("unknown_ca")
    );
}

#[tokio::test]
async fn server_refuses_an_unknown_sni() {
    let pki = Pki::new("example.org");
    let m = pki.manager(HOUR);
    let client_id = pki.id("/ecs/prod/client");
    let server_id = pki.id("/ecs/prod/server");
    m.ensure(&client_id).unwrap();
    m.ensure(&server_id).unwrap();
    let absent = pki.id("/ecs/prod/absent");
    let (c, s) = handshake(&m, &client_id, &absent, &absent, &m).await;
    assert!(c.is_err());
    assert!(s.is_err());
}

#[tokio::test]
async fn server_refuses_a_client_without_certificate() {
    let pki = Pki::new("example.org");
    let m = pki.manager(HOUR);
    let server_id = pki.id("/ecs/prod/server");
    m.ensure(&server_id).unwrap();
    // The source has no SVID on this manager: the client resolver has nothing to send.
    let nobody = pki.id("/ecs/prod/nobody");
    let (_c, s) = handshake(&m, &nobody, &server_id, &server_id, &m).await;
    let err = s.expect_err("server accepted a client without certificate");
    assert_eq!(rejection_of_io(&err), Some(Rejection::NoCertificate));
}
