use std::time::Duration;

use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::{Pki, TempDir, check_with, mode};
use crate::identity::{Ca, IdentityError, Issuer, Rejection, SpiffeId, TrustBundle, TrustDomain};

#[test]
fn init_writes_anchor_and_bundle_and_refuses_to_overwrite() {
    let tmp = TempDir::new("init");
    let dir = tmp.path().join("ca");
    let td = TrustDomain::new("example.org").unwrap();
    let ca = Ca::init(&dir, td.clone()).unwrap();
    assert_eq!(ca.anchor_count(), 1);
    assert_eq!(TrustBundle::load(&dir.join("bundle.pem")).unwrap().len(), 1);
    assert!(matches!(
        Ca::init(&dir, td),
        Err(IdentityError::CaExists(_))
    ));
    let reopened = Ca::open(&dir).unwrap();
    assert_eq!(reopened.trust_domain().as_str(), "example.org");
}

#[test]
fn key_files_are_private() {
    let pki = Pki::new("example.org");
    let ca_dir = pki.tmp.path().join("ca");
    assert_eq!(mode(&ca_dir.join("anchors/1.key")), 0o600);
    assert_eq!(mode(&pki.node.join("issuer.key")), 0o600);
    assert_eq!(mode(&pki.node.join("issuer.pem")), 0o644);
    let mut ca = Ca::open(&ca_dir).unwrap();
    ca.rotate().unwrap();
    ca.activate(Duration::ZERO).unwrap();
    assert_eq!(mode(&ca_dir.join("anchors/2.key")), 0o600);
    assert_eq!(mode(&pki.node.join("issuer.key")), 0o600);
}

#[test]
fn intermediate_names_its_instance_and_is_a_pathlen_0_ca() {
    let pki = Pki::new("example.org");
    let issuer = pki.issuer();
    assert_eq!(
        issuer.instance_id().to_string(),
        "spiffe://example.org/ecsmesh/instance/i-1"
    );
    let (_, cert) = X509Certificate::from_der(issuer.certificate()).unwrap();
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign());
    let uris: Vec<_> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter(|g| matches!(g, GeneralName::URI(_)))
        .collect();
    assert_eq!(uris.len(), 1);
    assert_eq!(
        Ca::open(&pki.tmp.path().join("ca"))
            .unwrap()
            .instances()
            .len(),
        1
    );
}

#[test]
fn svid_is_a_leaf_with_one_uri_san_and_both_ekus() {
    let pki = Pki::new("example.org");
    let id = pki.id("/ecs/prod/orders");
    let svid = pki
        .issuer()
        .issue_svid(&id, Duration::from_secs(5))
        .unwrap();
    let (_, cert) = X509Certificate::from_der(&svid.chain[0]).unwrap();
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert_eq!(
        svid.not_after.duration_since(svid.not_before).unwrap(),
        Duration::from_secs(5)
    );
    assert_eq!(
        svid.refresh_at(),
        svid.not_before + Duration::from_millis(2500)
    );
    assert_eq!(svid.serial.len(), 32);
    assert!(format!("{svid:?}").contains("orders"));
}

#[test]
fn issuer_refuses_short_lifetimes_and_foreign_trust_domains() {
    let pki = Pki::new("example.org");
    let issuer = pki.issuer();
    assert!(matches!(
        issuer.issue_svid(&pki.id("/a"), Duration::from_millis(999)),
        Err(IdentityError::LifetimeTooShort)
    ));
    let foreign = SpiffeId::parse("spiffe://other.org/a").unwrap();
    assert!(matches!(
        issuer.issue_svid(&foreign, Duration::from_secs(60)),
        Err(IdentityError::ForeignTrustDomain { .. })
    ));
}

#[test]
fn issuer_load_refuses_a_key_of_another_certificate() {
    let pki = Pki::new("example.org");
    let other = Pki::new("example.org");
    std::fs::copy(other.node.join("issuer.key"), pki.node.join("issuer.key")).unwrap();
    let err = Issuer::load(&pki.node).unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");
}

#[test]
fn rotate_keeps_old_svids_valid_and_retire_drops_them() {
    let pki = Pki::new("example.org");
    let ca_dir = pki.tmp.path().join("ca");
    let id = pki.id("/ecs/prod/orders");
    let old_issuer = pki.issuer();
    let old = old_issuer
        .issue_svid(&id, Duration::from_secs(3600))
        .unwrap();

    let mut ca = Ca::open(&ca_dir).unwrap();
    let staged = ca.rotate().unwrap();
    assert_eq!(ca.anchor_count(), 2);
    // Staging changes bundles only: the issuer still chains to the old anchor.
    assert_eq!(pki.issuer().certificate(), old_issuer.certificate());
    assert_eq!(pki.bundle().len(), 2);
    assert_eq!(ca.activate(Duration::ZERO).unwrap(), staged);
    assert_eq!(ca.active_fingerprint().unwrap(), staged);
    let new_issuer = pki.issuer();
    assert_ne!(new_issuer.certificate(), old_issuer.certificate());
    assert_eq!(new_issuer.instance_id(), old_issuer.instance_id());
    let new = new_issuer
        .issue_svid(&id, Duration::from_secs(3600))
        .unwrap();

    let td = std::slice::from_ref(&pki.td);
    let bundle = pki.bundle();
    assert_eq!(bundle.len(), 2);
    assert_eq!(
        TrustBundle::load(&ca_dir.join("bundle.pem")).unwrap().len(),
        2
    );
    assert_eq!(check_with(&bundle, td, &old.chain).unwrap(), id);
    assert_eq!(check_with(&bundle, td, &new.chain).unwrap(), id);

    // The CA state survived a reopen: retire works from a fresh handle.
    let mut ca = Ca::open(&ca_dir).unwrap();
    assert_eq!(ca.retire().unwrap().len(), 1);
    assert_eq!(ca.retire().unwrap().len(), 0);
    let bundle = pki.bundle();
    assert_eq!(bundle.len(), 1);
    assert_eq!(
        TrustBundle::load(&ca_dir.join("bundle.pem")).unwrap().len(),
        1
    );
    assert!(matches!(
        check_with(&bundle, td, &old.chain),
        Err(Rejection::UnknownCa(_))
    ));
    assert_eq!(check_with(&bundle, td, &new.chain).unwrap(), id);
}

#[test]
fn leaves_can_be_signed_by_the_active_anchor_after_rotation() {
    let pki = Pki::new("example.org");
    let mut ca = Ca::open(&pki.tmp.path().join("ca")).unwrap();
    ca.rotate().unwrap();
    ca.activate(Duration::ZERO).unwrap();
    ca.retire().unwrap();
    let (pem, key) = ca
        .issue_leaf(&crate::identity::LeafSpec {
            uris: vec!["spiffe://example.org/x".into()],
            ..Default::default()
        })
        .unwrap();
    assert!(key.contains("PRIVATE KEY"));
    let chain = super::certs(&pem);
    // It chains to the active anchor (no unknown_ca), and, signed by the anchor itself,
    // is refused as no SVID: the root signs issuing CAs only.
    assert!(matches!(
        pki.check(&chain),
        Err(Rejection::IssuedByAnchor(id)) if id.to_string() == "spiffe://example.org/x"
    ));
}

#[test]
fn rotation_steps_refuse_out_of_order() {
    use crate::identity::ca::{AnchorRole, RotationError};
    let pki = Pki::new("example.org");
    let mut ca = Ca::open(&pki.tmp.path().join("ca")).unwrap();
    assert!(matches!(
        ca.activate(Duration::ZERO),
        Err(RotationError::NothingStaged)
    ));
    let t0 = std::time::SystemTime::now();
    let staged = ca.rotate_at(t0).unwrap();
    assert!(matches!(
        ca.rotate_at(t0),
        Err(RotationError::AlreadyStaged { anchor: 2 })
    ));
    // Retiring now would drop the staged anchor.
    assert!(matches!(
        ca.retire(),
        Err(RotationError::StagedPending { anchor: 2 })
    ));
    let roles = |ca: &Ca| -> Vec<AnchorRole> {
        ca.anchors(t0)
            .unwrap()
            .into_iter()
            .map(|a| a.role)
            .collect()
    };
    assert_eq!(
        roles(&ca),
        [AnchorRole::Active, AnchorRole::Staged(Duration::ZERO)]
    );
    // Too soon: the state survives a reopen, and nothing was re-issued.
    let issuer_before = pki.issuer().certificate().clone();
    let mut ca = Ca::open(&pki.tmp.path().join("ca")).unwrap();
    let err = ca
        .activate_at(Duration::from_secs(300), t0 + Duration::from_secs(299))
        .unwrap_err();
    assert!(
        matches!(
            err,
            RotationError::TooSoon {
                staged_secs: 299,
                min_secs: 300,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(pki.issuer().certificate(), &issuer_before);
    let active = ca
        .activate_at(Duration::from_secs(300), t0 + Duration::from_secs(300))
        .unwrap();
    assert_eq!(active, staged);
    assert_ne!(pki.issuer().certificate(), &issuer_before);
    assert_eq!(roles(&ca), [AnchorRole::Old, AnchorRole::Active]);
}
