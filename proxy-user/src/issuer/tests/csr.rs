//! CSR checks, directly and through a request.
use rcgen::{CertificateParams, CustomExtension, KeyPair, SanType};

use super::*;
use crate::{identity::DEFAULT_TEMPLATE, issuer::csr::check};

#[test]
fn a_plain_p256_csr_passes_and_its_key_is_what_gets_certified() {
    let (csr, key) = csr_and_key();
    let got = check(&csr).unwrap();
    assert_eq!(
        rcgen::PublicKeyData::der_bytes(&got),
        rcgen::PublicKeyData::der_bytes(&key)
    );
}

#[test]
fn csrs_asking_for_names_or_a_ca_are_refused() {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(
        "spiffe://mesh.test/ecs/prod/admin".try_into().unwrap(),
    )];
    assert_eq!(reason(check(&csr_with(&key, p))), Reason::CsrExtraSans);
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::DnsName("issuer.example".try_into().unwrap())];
    assert_eq!(reason(check(&csr_with(&key, p))), Reason::CsrExtraSans);
    assert_eq!(
        reason(check(&csr_with(&key, ca_params(true)))),
        Reason::CsrCa
    );
    // basicConstraints with cA=false is harmless.
    check(&csr_with(&key, ca_params(false))).unwrap();
}

#[test]
fn malformed_csrs_are_refused() {
    let (csr, _) = csr_and_key();
    for bad in [
        "not pem".to_owned(),
        csr.replace("CERTIFICATE REQUEST", "CERTIFICATE"),
        pem::encode(&pem::Pem::new(
            "CERTIFICATE REQUEST",
            vec![0x30, 0x03, 1, 2, 3],
        )),
    ] {
        assert_eq!(reason(check(&bad)), Reason::MalformedCsr, "{bad}");
    }
    // Another key type than P-256.
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let other = csr_with(&p384, CertificateParams::default());
    assert_eq!(reason(check(&other)), Reason::MalformedCsr);
    // A signature that does not verify: the last byte of the signature flipped.
    let mut der = pem::parse(&csr).unwrap().into_contents();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    assert_eq!(reason(check(&tampered)), Reason::MalformedCsr);
    // A public key swapped for another one (the signature is the first key's).
    let (csr2, _) = csr_and_key();
    let (a, b) = (
        pem::parse(&csr).unwrap().into_contents(),
        pem::parse(&csr2).unwrap().into_contents(),
    );
    let point_of = |der: &[u8]| {
        let (_, req) =
            <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<_>>::from_der(der).unwrap();
        req.certification_request_info
            .subject_pki
            .subject_public_key
            .data
            .to_vec()
    };
    let (pa, pb) = (point_of(&a), point_of(&b));
    let i = a
        .windows(pa.len())
        .position(|w| w == pa.as_slice())
        .unwrap();
    let mut swapped = a.clone();
    swapped[i..i + pb.len()].copy_from_slice(&pb);
    let swapped = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", swapped));
    assert_eq!(reason(check(&swapped)), Reason::MalformedCsr);
}

#[tokio::test]
async fn requests_with_a_bad_csr_are_refused_before_anything_is_issued() {
    let f = Fixture::new(DEFAULT_TEMPLATE);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let req = attest_request(&document(INSTANCE), csr_with(&key, ca_params(true)));
    let r = f.service.attest(req, &mut Subject::default()).await;
    assert_eq!(reason(r), Reason::CsrCa);
    // Nothing was recorded: the instance can still attest.
    f.attest().await.unwrap();
}

/// Params whose CSR requests basicConstraints with `cA` as given (rcgen itself refuses
/// to put `is_ca` in a CSR).
fn ca_params(ca: bool) -> CertificateParams {
    // SEQUENCE { BOOLEAN TRUE } or the empty SEQUENCE (cA defaults to FALSE).
    let value = if ca {
        vec![0x30, 0x03, 0x01, 0x01, 0xff]
    } else {
        vec![0x30, 0x00]
    };
    let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 19], value);
    ext.set_criticality(true);
    let mut p = CertificateParams::default();
    p.custom_extensions = vec![ext];
    p
}
