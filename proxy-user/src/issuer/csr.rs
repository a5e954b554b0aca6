//! The CSRs nodes send: PKCS#10, PEM, ECDSA P-256 only, self-signature verified. The
//! issuer takes nothing from a CSR but its public key; a CSR asking for names or a CA
//! certificate is refused rather than silently trimmed, so a confused client learns.
use rcgen::{PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm};
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use x509_parser::{
    certification_request::X509CertificationRequest,
    cri_attributes::ParsedCriAttribute,
    extensions::ParsedExtension,
    oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
        OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_SUBJECT_ALT_NAME,
    },
    prelude::FromDer,
};

use super::Refused;
use crate::identity::protocol::Reason;

/// The public key of a checked CSR, in the form rcgen signs for.
#[derive(Debug, Clone)]
pub struct CsrKey {
    /// The uncompressed EC point (the SPKI's BIT STRING contents).
    point: Vec<u8>,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// Parses and checks a PEM CSR; returns its key.
pub fn check(pem_text: &str) -> Result<CsrKey, Refused> {
    let malformed = |m: String| Refused::new(Reason::MalformedCsr, m);
    let block = pem::parse(pem_text).map_err(|e| malformed(format!("not PEM: {e}")))?;
    if block.tag() != "CERTIFICATE REQUEST" {
        return Err(malformed(format!(
            "PEM block is {:?}, expected CERTIFICATE REQUEST",
            block.tag()
        )));
    }
    let (rest, csr) = X509CertificationRequest::from_der(block.contents())
        .map_err(|e| malformed(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(malformed("trailing data after the request".into()));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let p256 = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == OID_EC_P256);
    if !p256 {
        return Err(malformed("only ECDSA P-256 keys are accepted".into()));
    }
    if csr.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(malformed(
            "the request must be signed with ecdsa-with-SHA256".into(),
        ));
    }
    let point = spki.subject_public_key.data.to_vec();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point)
        .verify(info.raw, &csr.signature_value.data)
        .map_err(|_| malformed("the request's signature does not verify".into()))?;
    // By OID, not by what x509-parser made of the value: a SAN it cannot parse is a SAN.
    let requested = info
        .iter_attributes()
        .filter_map(|a| match a.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(r) => Some(r.extensions.iter()),
            _ => None,
        });
    for ext in requested.flatten() {
        if ext.oid == OID_X509_EXT_SUBJECT_ALT_NAME {
            return Err(Refused::new(
                Reason::CsrExtraSans,
                "the request asks for subject alternative names; the issuer names certificates itself",
            ));
        }
        if ext.oid == OID_X509_EXT_BASIC_CONSTRAINTS {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) if !bc.ca => {}
                ParsedExtension::BasicConstraints(_) => {
                    return Err(Refused::new(
                        Reason::CsrCa,
                        "the request asks for a CA certificate",
                    ));
                }
                _ => return Err(malformed("unreadable basicConstraints".into())),
            }
        }
    }
    Ok(CsrKey { point })
}
