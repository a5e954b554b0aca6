//! What the issuer sends, checked before use; the node certificate saved by an earlier
//! run, checked the same way.
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, UnixTime, pem::PemObject};

use super::{Call, NODE_CERT_FILE, NODE_KEY_FILE, NodeCert, RemoteError, RemoteIssuer};
use crate::identity::{
    IdentityError, Svid, Usage, protocol::Issued, verify::CertInfo, verify_peer,
};

impl RemoteIssuer {
    /// Checks what the issuer sent before using it: it chains to our bundle, names one
    /// identity of our trust domain (the one `issued` says), and certifies the key made
    /// here. Returns the SVID and the chain PEM.
    pub(super) fn accept(
        &self,
        call: Call,
        issued: &Issued,
        key: KeyPair,
        usage: Usage,
    ) -> Result<(Svid, String), RemoteError> {
        let svid = self.verified(call, &issued.chain, Some(&issued.spiffe_id), key, usage)?;
        Ok((svid, issued.chain.clone()))
    }

    /// `chain_pem` verified now under the bundle, for `key`; `expected`: the identity it
    /// must name.
    fn verified(
        &self,
        call: Call,
        chain_pem: &str,
        expected: Option<&str>,
        key: KeyPair,
        usage: Usage,
    ) -> Result<Svid, RemoteError> {
        let bad = |message: String| RemoteError::Protocol { call, message };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("chain: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(bad("empty chain".into()));
        };
        let id = verify_peer(
            &self.bundle.load(),
            std::slice::from_ref(&self.cfg.trust_domain),
            leaf,
            &chain[1..],
            UnixTime::now(),
            usage,
        )
        .map_err(|r| bad(format!("the certificate does not verify: {r}")))?;
        if let Some(want) = expected
            && id.to_string() != want
        {
            return Err(bad(format!(
                "spiffe_id {want} but the certificate says {id}"
            )));
        }
        let info = CertInfo::parse(leaf).map_err(bad)?;
        if info.spki != key.public_key_der() {
            return Err(bad(
                "the certificate is not for the key this node made".into()
            ));
        }
        Ok(Svid::from_chain(id, chain, &key)?)
    }

    /// The node certificate of an earlier run, if both files are there; an error when it
    /// no longer verifies (expired, another bundle) or is not for the saved key.
    pub(super) fn load_saved(&self) -> Result<Option<NodeCert>, RemoteError> {
        let dir = self.dir();
        let (cert_path, key_path) = (dir.join(NODE_CERT_FILE), dir.join(NODE_KEY_FILE));
        if !cert_path.exists() || !key_path.exists() {
            return Ok(None);
        }
        let chain_pem = super::super::read_string(&cert_path)?;
        let key = KeyPair::from_pem(&super::super::read_string(&key_path)?)
            .map_err(|e| IdentityError::invalid(key_path.display(), e))?;
        let svid = self.verified(Call::Node, &chain_pem, None, key, Usage::Client)?;
        Ok(Some(NodeCert {
            certified: svid.certified_key(),
            chain: svid.chain.clone(),
            not_before: svid.not_before,
            not_after: svid.not_after,
        }))
    }
}
