//! What a node trusts and signs with, by fingerprint, so an operator (and `ecsmesh ca
//! activate` / `retire`) can see an anchor rotation roll out across the nodes.
use std::{fmt, time::Duration};

use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};

use super::{Issuer, SpiffeId, TrustBundle, Usage, verify_peer};

/// SHA-256 of a certificate's DER encoding, lowercase hex (what `openssl x509 -fingerprint
/// -sha256` prints, without the colons).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
        Fingerprint(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 16 hex digits: enough to tell anchors apart in a log line.
    pub fn short(&self) -> &str {
        &self.0[..16.min(self.0.len())]
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A node's trust state: the anchors of its bundle and the issuer it signs SVIDs with.
/// Served as JSON on the admin route `/trust`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustStatus {
    /// Fingerprints of the anchors in the bundle, in bundle order.
    pub anchors: Vec<Fingerprint>,
    /// None in issuer mode until the issuer has issued this node anything.
    pub issuer: Option<IssuerStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerStatus {
    pub identity: SpiffeId,
    pub fingerprint: Fingerprint,
    /// The bundle anchor the issuer chains to.
    pub anchor: Fingerprint,
}

impl TrustStatus {
    /// Fails when the issuer chains to no anchor of the bundle (the caller refuses such
    /// material anyway).
    pub fn of(bundle: &TrustBundle, issuer: &Issuer) -> Option<TrustStatus> {
        Some(TrustStatus {
            anchors: bundle.certificates().iter().map(Fingerprint::of).collect(),
            issuer: Some(IssuerStatus {
                identity: issuer.instance_id().clone(),
                fingerprint: Fingerprint::of(issuer.certificate()),
                anchor: signing_anchor(bundle, issuer)?,
            }),
        })
    }

    /// Issuer mode: the anchors of `bundle` and the remote issuing CA of `chain` (leaf,
    /// then issuing CA: a certificate the issuer sent), when it chains to one of them.
    pub fn of_remote(
        bundle: &TrustBundle,
        chain: Option<&[CertificateDer<'static>]>,
    ) -> TrustStatus {
        TrustStatus {
            anchors: bundle.certificates().iter().map(Fingerprint::of).collect(),
            issuer: chain.and_then(|chain| {
                let ca = chain.get(1)?;
                let info = super::verify::CertInfo::parse(ca).ok()?;
                let identity = SpiffeId::parse(info.uris.first()?).ok()?;
                let leaf = super::verify::CertInfo::parse(&chain[0]).ok()?;
                let id = SpiffeId::parse(leaf.uris.first()?).ok()?;
                Some(IssuerStatus {
                    identity,
                    fingerprint: Fingerprint::of(ca),
                    anchor: anchor_of(bundle, &id, chain)?,
                })
            }),
        }
    }

    pub fn trusts(&self, anchor: &Fingerprint) -> bool {
        self.anchors.contains(anchor)
    }
}

/// The anchor of `bundle` that `issuer` chains to: a throwaway SVID is verified against
/// each anchor alone, exactly as a peer would verify it.
fn signing_anchor(bundle: &TrustBundle, issuer: &Issuer) -> Option<Fingerprint> {
    let id = issuer.instance_id();
    let probe = issuer.issue_svid(id, Duration::from_secs(60)).ok()?;
    anchor_of(bundle, id, &probe.chain)
}

/// The anchor of `bundle` that `chain` (an SVID of `id`, then its issuers) verifies under,
/// tried alone, exactly as a peer would verify it.
fn anchor_of(
    bundle: &TrustBundle,
    id: &SpiffeId,
    chain: &[CertificateDer<'static>],
) -> Option<Fingerprint> {
    let td = std::slice::from_ref(id.trust_domain());
    bundle.certificates().iter().find_map(|cert| {
        let one = TrustBundle::from_certificates(vec![cert.clone()]).ok()?;
        verify_peer(
            &one,
            td,
            &chain[0],
            &chain[1..],
            UnixTime::now(),
            Usage::Server,
        )
        .ok()
        .map(|_| Fingerprint::of(cert))
    })
}
