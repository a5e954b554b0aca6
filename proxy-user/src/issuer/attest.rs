//! `aws_iid` attestation: the instance identity document and its PKCS#1 v1.5 SHA-256
//! signature, checked against AWS's published certificates (one per region or partition,
//! configured as `iid_certificates`). Only the RSA key of those certificates is used; AWS
//! publishes them self-signed, so there is no chain to check.
use std::path::{Path, PathBuf};

use base64::Engine;
use ring::signature::{RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, UnparsedPublicKey};
use x509_parser::{oid_registry::OID_PKCS1_RSAENCRYPTION, prelude::FromDer};

use super::{Refused, config::is_instance_id};
use crate::identity::protocol::Reason;

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("{path}: {message}")]
    Certificate { path: PathBuf, message: String },
}

/// The RSA public keys that sign instance identity documents.
#[derive(Debug, Clone)]
pub struct IidVerifier {
    /// PKCS#1 `RSAPublicKey` DER, as ring wants it, with the file it came from.
    keys: Vec<(PathBuf, Vec<u8>)>,
}

/// The fields of a verified document the issuer uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceIdentity {
    pub instance_id: String,
    pub region: String,
    pub account_id: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    instance_id: Option<String>,
    region: Option<String>,
    account_id: Option<String>,
}

impl IidVerifier {
    pub fn load(paths: &[PathBuf]) -> Result<Self, AttestError> {
        let keys = paths
            .iter()
            .map(|p| {
                let text = std::fs::read(p).map_err(|e| AttestError::Certificate {
                    path: p.clone(),
                    message: e.to_string(),
                })?;
                Ok((p.clone(), rsa_key_of(&text, p)?))
            })
            .collect::<Result<_, AttestError>>()?;
        Ok(Self { keys })
    }

    /// From PEM text (tests).
    #[cfg(test)]
    pub fn from_pem(pem: &str) -> Result<Self, AttestError> {
        let what = Path::new("iid certificate");
        Ok(Self {
            keys: vec![(what.to_owned(), rsa_key_of(pem.as_bytes(), what)?)],
        })
    }

    /// Verifies `signature` (base64) over the exact bytes of `document`, then reads it.
    pub fn verify(&self, document: &str, signature: &str) -> Result<InstanceIdentity, Refused> {
        // IMDS serves the signature with line breaks.
        let compact: String = signature.split_whitespace().collect();
        let sig = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|e| {
                Refused::new(
                    Reason::ForgedAttestation,
                    format!("signature is not base64: {e}"),
                )
            })?;
        let valid = self.keys.iter().any(|(_, key)| {
            UnparsedPublicKey::new(&RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, key)
                .verify(document.as_bytes(), &sig)
                .is_ok()
        });
        if !valid {
            return Err(Refused::new(
                Reason::ForgedAttestation,
                "the document's signature does not verify against any configured AWS certificate",
            ));
        }
        parse_document(document)
    }
}

fn parse_document(document: &str) -> Result<InstanceIdentity, Refused> {
    let bad = |m: String| Refused::new(Reason::MalformedAttestation, m);
    let doc: Document =
        serde_json::from_str(document).map_err(|e| bad(format!("document is not JSON: {e}")))?;
    let (Some(instance_id), Some(region), Some(account_id)) =
        (doc.instance_id, doc.region, doc.account_id)
    else {
        return Err(bad(
            "document lacks instanceId, region or accountId".to_owned()
        ));
    };
    if !is_instance_id(&instance_id) {
        return Err(bad(format!("{instance_id:?} is not an EC2 instance id")));
    }
    let plain = |s: &str| {
        !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !plain(&region) || !plain(&account_id) {
        return Err(bad("region or accountId is malformed".to_owned()));
    }
    Ok(InstanceIdentity {
        instance_id,
        region,
        account_id,
    })
}

/// The RSA public key of the first certificate in `pem`.
fn rsa_key_of(pem: &[u8], path: &Path) -> Result<Vec<u8>, AttestError> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let err = |message: String| AttestError::Certificate {
        path: path.to_owned(),
        message,
    };
    let der = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or_else(|| err("no CERTIFICATE in PEM".into()))?
        .map_err(|e| err(e.to_string()))?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der)
        .map_err(|e| err(e.to_string()))?;
    let spki = cert.public_key();
    if spki.algorithm.algorithm != OID_PKCS1_RSAENCRYPTION {
        return Err(err("not an RSA certificate".into()));
    }
    Ok(spki.subject_public_key.data.to_vec())
}
