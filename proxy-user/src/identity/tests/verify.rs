use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};

use super::{Pki, check_with};
use crate::identity::{
    LeafSpec, Rejection, TrustBundle, TrustDomain, Usage, peer_identity, verify_peer,
};

const ID: &str = "spiffe://example.org/ecs/prod/orders";

fn reason(r: Result<crate::identity::SpiffeId, Rejection>) -> &'static str {
    r.expect_err("certificate was accepted").reason()
}

#[test]
fn accepts_an_svid_chained_through_the_instance_issuer() {
    let pki = Pki::new("example.org");
    let id = pki.id("/ecs/prod/orders");
    let svid = pki
        .issuer()
        .issue_svid(&id, Duration::from_secs(3600))
        .unwrap();
    assert_eq!(svid.chain.len(), 2);
    assert_eq!(pki.check(&svid.chain).unwrap(), id);
    let server = verify_peer(
        &pki.bundle(),
        std::slice::from_ref(&pki.td),
        &svid.chain[0],
        &svid.chain[1..],
        UnixTime::now(),
        Usage::Server,
    );
    assert_eq!(server.unwrap(), id);
    assert_eq!(peer_identity(&svid.chain), Some(id));
}

#[test]
fn accepts_a_ca_issued_leaf_through_the_issuer() {
    let pki = Pki::new("example.org");
    let chain = pki.leaf(pki.leaf_spec(&[ID]));
    assert_eq!(chain.len(), 2);
    assert_eq!(pki.check(&chain).unwrap().to_string(), ID);
}

#[test]
fn rejects_an_svid_of_another_ca() {
    let pki = Pki::new("example.org");
    let other = Pki::new("example.org");
    let svid = other
        .issuer()
        .issue_svid(&other.id("/ecs/prod/orders"), Duration::from_secs(3600))
        .unwrap();
    assert_eq!(reason(pki.check(&svid.chain)), "unknown_ca");
    assert!(matches!(
        pki.check(&svid.chain),
        Err(Rejection::UnknownCa(_))
    ));
}

#[test]
fn rejects_an_expired_certificate() {
    let pki = Pki::new("example.org");
    let chain = pki.leaf(LeafSpec {
        lifetime: Duration::from_secs(60),
        not_before_ago: Duration::from_secs(120),
        ..pki.leaf_spec(&[ID])
    });
    assert_eq!(pki.check(&chain), Err(Rejection::Expired));
    assert_eq!(Rejection::Expired.reason(), "expired");
}

#[test]
fn rejects_a_certificate_not_yet_valid() {
    let pki = Pki::new("example.org");
    let svid = pki
        .issuer()
        .issue_svid(&pki.id("/a"), Duration::from_secs(3600))
        .unwrap();
    let an_hour_ago = UnixTime::since_unix_epoch(
        UnixTime::now()
            .as_secs()
            .checked_sub(3600)
            .map(Duration::from_secs)
            .unwrap(),
    );
    let r = verify_peer(
        &pki.bundle(),
        std::slice::from_ref(&pki.td),
        &svid.chain[0],
        &svid.chain[1..],
        an_hour_ago,
        Usage::Client,
    );
    assert_eq!(r, Err(Rejection::NotYetValid));
    assert_eq!(Rejection::NotYetValid.reason(), "not_yet_valid");
}

#[test]
fn rejects_a_trust_domain_that_is_not_allowed() {
    let pki = Pki::new("example.org");
    let chain = pki.leaf(pki.leaf_spec(&[ID]));
    let allowed = [TrustDomain::new("other.org").unwrap()];
    assert_eq!(
        reason(check_with(&pki.bundle(), &allowed, &chain)),
        "trust_domain"
    );
}

#[test]
fn rejects_two_uri_sans() {
    let pki = Pki::new("example.org");
    let chain = pki.leaf(pki.leaf_spec(&[ID, "spiffe://example.org/ecs/prod/admin"]));
    assert_eq!(pki.check(&chain), Err(Rejection::MultipleUriSans(2)));
    assert_eq!(reason(pki.check(&chain)), "multiple_uri_sans");
}

#[test]
fn rejects_no_uri_san() {
    let pki = Pki::new("example.org");
    let chain = pki.leaf(pki.leaf_spec(&[]));
    assert_eq!(pki.check(&chain), Err(Rejection::NoUriSan));
    assert_eq!(reason(pki.check(&chain)), "no_uri_san");
    assert_eq!(peer_identity(&chain), None);
}

#[test]
fn rejects_a_uri_san_that_is_not_spiffe() {
    let pki = Pki::new("example.org");
    let chain = pki.leaf(pki.leaf_spec(&["https://example.org/ecs/prod/orders"]));
    assert!(matches!(pki.check(&chain), Err(Rejection::NotSpiffe(u)) if u.starts_with("https:")));
    assert_eq!(reason(pki.check(&chain)), "not_spiffe");
}

#[test]
fn rejects_a_self_signed_leaf() {
    let pki = Pki::new("example.org");
    let chain = pki.leaf(LeafSpec {
        self_signed: true,
        issuer_dir: None,
        ..pki.leaf_spec(&[ID])
    });
    assert_eq!(chain.len(), 1);
    assert_eq!(reason(pki.check(&chain)), "unknown_ca");
}

#[test]
fn a_leaf_signed_directly_by_an_anchor_is_refused_even_by_its_own_bundle() {
    let pki = Pki::new("example.org");
    let other = Pki::new("example.org");
    let chain = other.leaf(LeafSpec {
        issuer_dir: None,
        ..other.leaf_spec(&[ID])
    });
    assert_eq!(chain.len(), 1, "the root signed the leaf itself");
    assert_eq!(reason(pki.check(&chain)), "unknown_ca");
    // The root stays offline and signs issuing CAs only: its own bundle refuses the
    // leaf too (a stolen root key still cannot mint SVIDs nodes accept without also
    // minting an issuer, which the chain then shows).
    assert_eq!(reason(other.check(&chain)), "issued_by_anchor");
    assert!(
        matches!(other.check(&chain), Err(Rejection::IssuedByAnchor(id)) if id.to_string() == ID)
    );
}

#[test]
fn a_federated_anchor_signs_only_for_its_own_trust_domain() {
    let ours = Pki::new("example.org");
    let partner = Pki::new("partner.test");
    // A node that federates with partner.test: both anchors, both trust domains allowed.
    let mut anchors = ours.bundle().certificates().to_vec();
    anchors.extend(partner.bundle().certificates().iter().cloned());
    let bundle = TrustBundle::from_certificates(anchors).unwrap();
    let allowed = [ours.td.clone(), partner.td.clone()];
    // Partner identities issued by the partner's CA: accepted.
    let theirs = partner.leaf(partner.leaf_spec(&["spiffe://partner.test/ecs/prod/api"]));
    assert_eq!(
        check_with(&bundle, &allowed, &theirs).unwrap().to_string(),
        "spiffe://partner.test/ecs/prod/api"
    );
    // The partner's CA (or whoever holds its issuer key) minting one of *our* identities:
    // refused, though the chain is valid and both trust domains are allowed.
    let forged = partner.leaf(partner.leaf_spec(&[ID]));
    let got = check_with(&bundle, &allowed, &forged);
    assert_eq!(reason(got.clone()), "anchor_trust_domain", "{got:?}");
    // Our own CA still issues our identities.
    let mine = ours.leaf(ours.leaf_spec(&[ID]));
    assert_eq!(
        check_with(&bundle, &allowed, &mine).unwrap().to_string(),
        ID
    );
}

#[test]
fn rejects_a_ca_certificate_used_as_a_leaf() {
    let pki = Pki::new("example.org");
    let issuer = pki.issuer().certificate().clone();
    assert_eq!(reason(pki.check(&[issuer])), "key_usage");
}

#[test]
fn rejects_garbage() {
    let pki = Pki::new("example.org");
    let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
    assert_eq!(reason(pki.check(&[junk])), "bad_certificate");
}

#[test]
fn reasons_are_stable_labels() {
    let id = crate::identity::SpiffeId::parse(ID).unwrap();
    let all = [
        (Rejection::NoCertificate, "no_certificate"),
        (Rejection::UnknownCa(String::new()), "unknown_ca"),
        (Rejection::Expired, "expired"),
        (Rejection::NotYetValid, "not_yet_valid"),
        (Rejection::NoUriSan, "no_uri_san"),
        (Rejection::MultipleUriSans(2), "multiple_uri_sans"),
        (Rejection::NotSpiffe(String::new()), "not_spiffe"),
        (Rejection::TrustDomain(id.clone()), "trust_domain"),
        (Rejection::KeyUsage(String::new()), "key_usage"),
        (
            Rejection::IdentityMismatch {
                expected: id.clone(),
                got: id.clone(),
            },
            "identity_mismatch",
        ),
        (Rejection::BadCertificate(String::new()), "bad_certificate"),
        (Rejection::IssuedByAnchor(id.clone()), "issued_by_anchor"),
        (
            Rejection::AnchorDomain {
                id: id.clone(),
                anchor: "partner.test".into(),
            },
            "anchor_trust_domain",
        ),
    ];
    for (r, label) in all {
        assert_eq!(r.reason(), label);
    }
}

#[test]
fn bundle_parses_pem_and_refuses_empty_input() {
    let pki = Pki::new("example.org");
    assert_eq!(pki.bundle().len(), 1);
    assert!(TrustBundle::from_pem("").is_err());
    assert!(
        TrustBundle::from_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .is_err()
    );
    let pem = std::fs::read_to_string(pki.node.join("bundle.pem")).unwrap();
    let twice = TrustBundle::from_pem(&format!("{pem}{pem}")).unwrap();
    assert_eq!(twice.len(), 2);
}
