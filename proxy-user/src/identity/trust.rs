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
    pub issuer: IssuerStatus,
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
            issuer: IssuerStatus {
                identity: issuer.instance_id().clone(),
                fingerprint: Fingerprint::of(issuer.certificate()),
                anchor: signing_anchor(bundle, issuer)?,
            },
        })
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
    let td = std::slice::from_ref(id.trust_domain());
    bundle.certificates().iter().find_map(|cert| {
        let one = TrustBundle::from_certificates(vec![cert.clone()]).ok()?;
        verify_peer(
            &one,
            td,
            &probe.chain[0],
            &probe.chain[1..],
            UnixTime::now(),
            Usage::Server,
        )
        .ok()
        .map(|_| Fingerprint::of(cert))
    })
}
