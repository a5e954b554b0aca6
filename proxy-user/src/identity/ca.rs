//! A small file-based CA (rcgen, ECDSA P-256) and the certificate objects a node proxy
//! loads from it.
//!
//! Hierarchy: trust anchors (self-signed roots, kept offline in the CA directory) sign one
//! issuer per container instance; an instance's node proxy signs short-lived SVIDs for its
//! own tasks. Per-instance issuers name their instance in a URI SAN so one instance can be
//! revoked alone, and several anchors can sit in the bundle at once so a rotation has an
//! overlap window with no outage.
//!
//! Rotation has three steps, each one visible on every node before the next may start
//! (the order of Linkerd's and cert-manager trust-manager's procedures):
//! 1. [`Ca::rotate`] *stages* a new anchor: it joins every bundle, nothing signs with it.
//! 2. [`Ca::activate`] re-issues every instance issuer under the staged anchor, once every
//!    node trusts it; a node that picked up its new issuer earlier would otherwise present
//!    certificates its peers refuse (`unknown_ca`).
//! 3. [`Ca::retire`] drops the old anchors, once every node signs under the new one.
//!
//! CA directory layout:
//! - `ca.toml`: trust domain, active anchor, anchors in the bundle, issued instances
//! - `anchors/<n>.pem`, `anchors/<n>.key` (0600)
//! - `bundle.pem`: every anchor currently trusted
//!
//! Instance output directory: `bundle.pem`, `issuer.pem`, `issuer.key` (0600).
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use super::{
    IdentityError, KEY_MODE, PUBLIC_MODE, SpiffeId, TrustDomain, create_private_dir, read_string,
    write_atomic,
};

use super::certgen::{Signer, ca_params, first_cert, leaf_params, now_secs, to_time};
use super::trust::Fingerprint;
use super::verify::CertInfo;
pub use super::verify::TrustBundle;

pub const STATE_FILE: &str = "ca.toml";
pub const ANCHOR_DIR: &str = "anchors";
pub const BUNDLE_FILE: &str = "bundle.pem";
pub const ISSUER_CERT_FILE: &str = "issuer.pem";
pub const ISSUER_KEY_FILE: &str = "issuer.key";

const DAY: Duration = Duration::from_secs(24 * 3600);
const ANCHOR_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// What to put in a leaf certificate made by [`Ca::issue_leaf`] (tooling and tests, which
/// need deliberately broken certificates too).
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// URI SANs, any number, SPIFFE or not.
    pub uris: Vec<String>,
    pub lifetime: Duration,
    /// Backdates `not_before`; with a short lifetime this makes an expired certificate.
    pub not_before_ago: Duration,
    pub self_signed: bool,
    /// Sign with this instance issuer (chain = leaf + issuer) instead of the active anchor.
    pub issuer_dir: Option<PathBuf>,
}

impl Default for LeafSpec {
    fn default() -> Self {
        Self {
            uris: Vec::new(),
            lifetime: DAY,
            not_before_ago: Duration::ZERO,
            self_signed: false,
            issuer_dir: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaState {
    trust_domain: TrustDomain,
    /// Anchor that signs new issuers.
    active_anchor: u32,
    /// Number the next anchor gets; anchors are never renumbered.
    next_anchor: u32,
    /// Anchors in the trust bundle, oldest first.
    bundle: Vec<u32>,
    /// An anchor in the bundle that does not sign yet (step 1 of a rotation).
    #[serde(default)]
    staged: Option<StagedAnchor>,
    #[serde(default)]
    instances: Vec<InstanceRecord>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StagedAnchor {
    anchor: u32,
    /// When it joined the bundles (seconds since the Unix epoch).
    since_unix: u64,
}

/// An anchor of the bundle, as `ca status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorInfo {
    pub number: u32,
    pub fingerprint: Fingerprint,
    pub role: AnchorRole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnchorRole {
    /// Signs the instance issuers.
    Active,
    /// In the bundles, not signing yet; staged this long ago.
    Staged(Duration),
    /// Still trusted, no longer signing: goes with `ca retire`.
    Old,
}

/// Why a rotation step refused to run.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(
        "anchor {anchor} is already staged; run `ecsmesh ca activate` (or finish the rotation) before staging another"
    )]
    AlreadyStaged { anchor: u32 },
    #[error("no anchor is staged; run `ecsmesh ca rotate` first")]
    NothingStaged,
    #[error(
        "anchor {anchor} was staged {staged_secs} s ago, less than the minimum of {min_secs} s: nodes may not have the new bundle yet (check them with --node, or wait)"
    )]
    TooSoon {
        anchor: u32,
        staged_secs: u64,
        min_secs: u64,
    },
    #[error(
        "anchor {anchor} is staged but not active; run `ecsmesh ca activate` before retiring, or the staged anchor would be dropped"
    )]
    StagedPending { anchor: u32 },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}
/// An issued instance issuer, remembered so that rotation can re-issue it in place.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceRecord {
    name: String,
    out: PathBuf,
}

/// An open CA directory.
pub struct Ca {
    dir: PathBuf,
    state: CaState,
    active: Signer,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a CA with one trust anchor in `dir`. Refuses to touch an existing CA: an
    /// overwritten anchor key would silently cut off every node that trusts it.
    pub fn init(dir: &Path, td: TrustDomain) -> Result<Ca, IdentityError> {
        if dir.join(STATE_FILE).exists() || dir.join(ANCHOR_DIR).exists() {
            return Err(IdentityError::CaExists(dir.to_owned()));
        }
        create_private_dir(dir)?;
        create_private_dir(&dir.join(ANCHOR_DIR))?;
        let state = CaState {
            trust_domain: td,
            active_anchor: 1,
            next_anchor: 2,
            bundle: vec![1],
            staged: None,
            instances: Vec::new(),
        };
        let active = new_anchor(dir, &state.trust_domain, 1)?;
        let ca = Ca {
            dir: dir.to_owned(),
            state,
            active,
        };
        ca.save_state()?;
        ca.write_ca_bundle()?;
        Ok(ca)
    }

    pub fn open(dir: &Path) -> Result<Ca, IdentityError> {
        let path = dir.join(STATE_FILE);
        let state: CaState = toml::from_str(&read_string(&path)?)
            .map_err(|e| IdentityError::invalid(path.display(), e))?;
        if !state.bundle.contains(&state.active_anchor) {
            return Err(IdentityError::invalid(
                path.display(),
                "active anchor is not in the bundle",
            ));
        }
        if let Some(st) = &state.staged
            && (!state.bundle.contains(&st.anchor) || st.anchor == state.active_anchor)
        {
            return Err(IdentityError::invalid(
                path.display(),
                "the staged anchor must be in the bundle and not active",
            ));
        }
        let active = load_anchor(dir, state.active_anchor)?;
        Ok(Ca {
            dir: dir.to_owned(),
            state,
            active,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.state.trust_domain
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the CA's trust bundle (all anchors currently trusted).
    pub fn bundle_path(&self) -> PathBuf {
        self.dir.join(BUNDLE_FILE)
    }

    /// Number of anchors in the bundle.
    pub fn anchor_count(&self) -> usize {
        self.state.bundle.len()
    }

    /// Instances with an issuer, and where their files are.
    pub fn instances(&self) -> Vec<(String, PathBuf)> {
        self.state
            .instances
            .iter()
            .map(|r| (r.name.clone(), r.out.clone()))
            .collect()
    }

    /// Issues (or re-issues) the issuer of one container instance into `out`.
    pub fn issue_intermediate(&mut self, instance: &str, out: &Path) -> Result<(), IdentityError> {
        // Validate the name before anything is written.
        instance_id(&self.state.trust_domain, instance)?;
        create_private_dir(out)?;
        let out = out.canonicalize().map_err(|e| IdentityError::io(out, e))?;
        self.write_instance(instance, &out)?;
        self.state.instances.retain(|r| r.name != instance);
        self.state.instances.push(InstanceRecord {
            name: instance.to_owned(),
            out,
        });
        self.save_state()
    }

    /// Step 1 of a rotation: makes a new anchor and adds it to the CA's and every
    /// instance's bundle. Nothing is signed with it yet; instance issuers are untouched.
    /// Returns the new anchor's fingerprint.
    pub fn rotate(&mut self) -> Result<Fingerprint, RotationError> {
        self.rotate_at(SystemTime::now())
    }

    pub(crate) fn rotate_at(&mut self, now: SystemTime) -> Result<Fingerprint, RotationError> {
        if let Some(st) = self.state.staged {
            return Err(RotationError::AlreadyStaged { anchor: st.anchor });
        }
        let n = self.state.next_anchor;
        new_anchor(&self.dir, &self.state.trust_domain, n)?;
        self.state.next_anchor = n + 1;
        self.state.bundle.push(n);
        self.state.staged = Some(StagedAnchor {
            anchor: n,
            since_unix: unix_secs(now),
        });
        self.save_state()?;
        self.write_bundles()?;
        Ok(self.fingerprint(n)?)
    }

    /// The staged anchor's fingerprint, if a rotation is under way.
    pub fn staged(&self) -> Result<Option<Fingerprint>, IdentityError> {
        self.state
            .staged
            .map(|st| self.fingerprint(st.anchor))
            .transpose()
    }

    /// The fingerprint of the anchor that signs instance issuers.
    pub fn active_fingerprint(&self) -> Result<Fingerprint, IdentityError> {
        self.fingerprint(self.state.active_anchor)
    }

    /// Step 2: makes the staged anchor the signer and re-issues every instance issuer
    /// under it. Refused while the anchor has been staged for less than `min_staged`
    /// (nodes reload bundles on file change, but bundles reach remote nodes out of band).
    pub fn activate(&mut self, min_staged: Duration) -> Result<Fingerprint, RotationError> {
        self.activate_at(min_staged, SystemTime::now())
    }

    pub(crate) fn activate_at(
        &mut self,
        min_staged: Duration,
        now: SystemTime,
    ) -> Result<Fingerprint, RotationError> {
        let st = self.state.staged.ok_or(RotationError::NothingStaged)?;
        let staged_secs = unix_secs(now).saturating_sub(st.since_unix);
        if staged_secs < min_staged.as_secs() {
            return Err(RotationError::TooSoon {
                anchor: st.anchor,
                staged_secs,
                min_secs: min_staged.as_secs(),
            });
        }
        self.active = load_anchor(&self.dir, st.anchor)?;
        self.state.active_anchor = st.anchor;
        self.state.staged = None;
        self.save_state()?;
        for rec in self.state.instances.clone() {
            self.write_instance(&rec.name, &rec.out)?;
        }
        Ok(self.fingerprint(st.anchor)?)
    }

    /// Step 3: drops every anchor but the active one from all bundles; returns the
    /// fingerprints that went. Refused while an anchor is staged (it would be dropped).
    pub fn retire(&mut self) -> Result<Vec<Fingerprint>, RotationError> {
        if let Some(st) = self.state.staged {
            return Err(RotationError::StagedPending { anchor: st.anchor });
        }
        let dropped = self
            .state
            .bundle
            .iter()
            .filter(|n| **n != self.state.active_anchor)
            .map(|n| self.fingerprint(*n))
            .collect::<Result<Vec<_>, _>>()?;
        self.state.bundle = vec![self.state.active_anchor];
        self.save_state()?;
        self.write_bundles()?;
        Ok(dropped)
    }

    /// Every anchor of the bundle with its role.
    pub fn anchors(&self, now: SystemTime) -> Result<Vec<AnchorInfo>, IdentityError> {
        self.state
            .bundle
            .iter()
            .map(|&n| {
                let role = match self.state.staged {
                    Some(st) if st.anchor == n => AnchorRole::Staged(Duration::from_secs(
                        unix_secs(now).saturating_sub(st.since_unix),
                    )),
                    _ if n == self.state.active_anchor => AnchorRole::Active,
                    _ => AnchorRole::Old,
                };
                Ok(AnchorInfo {
                    number: n,
                    fingerprint: self.fingerprint(n)?,
                    role,
                })
            })
            .collect()
    }

    fn fingerprint(&self, n: u32) -> Result<Fingerprint, IdentityError> {
        let path = anchor_path(&self.dir, n, "pem");
        let cert = first_cert(&read_string(&path)?, &path.display().to_string())?;
        Ok(Fingerprint::of(&cert))
    }

    /// The CA's bundle and every instance's bundle (issuers untouched).
    fn write_bundles(&self) -> Result<(), IdentityError> {
        self.write_ca_bundle()?;
        let pem = self.bundle_pem()?;
        for rec in &self.state.instances {
            write_atomic(&rec.out.join(BUNDLE_FILE), pem.as_bytes(), PUBLIC_MODE)?;
        }
        Ok(())
    }

    /// Makes an arbitrary leaf certificate; returns (certificate chain PEM, key PEM).
    pub fn issue_leaf(&self, spec: &LeafSpec) -> Result<(String, String), IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let not_before = now_secs() - to_time(spec.not_before_ago)?;
        let not_after = not_before + to_time(spec.lifetime)?;
        let params = leaf_params(&spec.uris, not_before, not_after)?;
        let chain = if spec.self_signed {
            params.self_signed(&key)?.pem()
        } else if let Some(dir) = &spec.issuer_dir {
            let issuer = Issuer::load(dir)?;
            let leaf = issuer.signer().sign(params, &key)?;
            format!("{}{}", leaf.pem(), issuer.certificate_pem())
        } else {
            self.active.sign(params, &key)?.pem()
        };
        Ok((chain, key.serialize_pem()))
    }

    fn write_instance(&self, name: &str, out: &Path) -> Result<(), IdentityError> {
        let id = instance_id(&self.state.trust_domain, name)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params(
            format!("ecsmesh instance {name}"),
            &self.state.trust_domain,
            INTERMEDIATE_LIFETIME,
            Some(0),
        )?;
        params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::Ia5String::try_from(
            id.to_string(),
        )?)];
        params.use_authority_key_identifier_extension = true;
        let cert = self.active.sign(params, &key)?;
        create_private_dir(out)?;
        // Bundle first: a watcher must never see an issuer its bundle does not anchor.
        write_atomic(
            &out.join(BUNDLE_FILE),
            self.bundle_pem()?.as_bytes(),
            PUBLIC_MODE,
        )?;
        write_atomic(
            &out.join(ISSUER_KEY_FILE),
            key.serialize_pem().as_bytes(),
            KEY_MODE,
        )?;
        write_atomic(
            &out.join(ISSUER_CERT_FILE),
            cert.pem().as_bytes(),
            PUBLIC_MODE,
        )
    }

    fn bundle_pem(&self) -> Result<String, IdentityError> {
        let mut pem = String::new();
        for n in &self.state.bundle {
            pem.push_str(&read_string(&anchor_path(&self.dir, *n, "pem"))?);
        }
        Ok(pem)
    }

    fn write_ca_bundle(&self) -> Result<(), IdentityError> {
        write_atomic(
            &self.bundle_path(),
            self.bundle_pem()?.as_bytes(),
            PUBLIC_MODE,
        )
    }

    fn save_state(&self) -> Result<(), IdentityError> {
        let path = self.dir.join(STATE_FILE);
        let text =
            toml::to_string(&self.state).map_err(|e| IdentityError::invalid(path.display(), e))?;
        write_atomic(&path, text.as_bytes(), PUBLIC_MODE)
    }
}

/// The identity an instance issuer carries: `spiffe://<td>/ecsmesh/instance/<name>`.
pub fn instance_id(td: &TrustDomain, instance: &str) -> Result<SpiffeId, IdentityError> {
    SpiffeId::parse(&format!("spiffe://{td}/ecsmesh/instance/{instance}"))
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn anchor_path(dir: &Path, n: u32, ext: &str) -> PathBuf {
    dir.join(ANCHOR_DIR).join(format!("{n}.{ext}"))
}

fn new_anchor(dir: &Path, td: &TrustDomain, n: u32) -> Result<Signer, IdentityError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(
        format!("ecsmesh trust anchor {n}"),
        td,
        ANCHOR_LIFETIME,
        None,
    )?;
    let cert = params.self_signed(&key)?;
    create_private_dir(&dir.join(ANCHOR_DIR))?;
    write_atomic(
        &anchor_path(dir, n, "key"),
        key.serialize_pem().as_bytes(),
        KEY_MODE,
    )?;
    write_atomic(
        &anchor_path(dir, n, "pem"),
        cert.pem().as_bytes(),
        PUBLIC_MODE,
    )?;
    Signer::from_parts(cert.der().clone(), key, &anchor_path(dir, n, "pem"))
}

fn load_anchor(dir: &Path, n: u32) -> Result<Signer, IdentityError> {
    let pem_path = anchor_path(dir, n, "pem");
    let key_path = anchor_path(dir, n, "key");
    let cert = first_cert(&read_string(&pem_path)?, &pem_path.display().to_string())?;
    let key = KeyPair::from_pem(&read_string(&key_path)?)
        .map_err(|e| IdentityError::invalid(key_path.display(), e))?;
    Signer::from_parts(cert, key, &pem_path)
}

/// A node's issuer: the instance intermediate and its key, from `issuer.pem`/`issuer.key`.
pub struct Issuer {
    id: SpiffeId,
    cert: CertificateDer<'static>,
    cert_pem: String,
    not_after: SystemTime,
    signer: Signer,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    pub fn load(dir: &Path) -> Result<Issuer, IdentityError> {
        let pem_path = dir.join(ISSUER_CERT_FILE);
        let key_path = dir.join(ISSUER_KEY_FILE);
        let cert_pem = read_string(&pem_path)?;
        let key = KeyPair::from_pem(&read_string(&key_path)?)
            .map_err(|e| IdentityError::invalid(key_path.display(), e))?;
        Self::from_parts(cert_pem, key, &pem_path)
    }

    /// An issuer from its certificate and key as PEM text (a secret store's copy of
    /// `issuer.pem` and `issuer.key`); `what` names the source in errors.
    pub fn from_pem(cert_pem: &str, key_pem: &str, what: &Path) -> Result<Issuer, IdentityError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| IdentityError::invalid(format!("{} (key)", what.display()), e))?;
        Self::from_parts(cert_pem.to_owned(), key, what)
    }

    fn from_parts(cert_pem: String, key: KeyPair, what: &Path) -> Result<Issuer, IdentityError> {
        let cert = first_cert(&cert_pem, &what.display().to_string())?;
        let info = CertInfo::parse(&cert).map_err(|r| IdentityError::invalid(what.display(), r))?;
        let id = match info.uris.as_slice() {
            [uri] => SpiffeId::parse(uri)?,
            _ => {
                return Err(IdentityError::invalid(
                    what.display(),
                    "an issuer carries exactly one spiffe:// URI SAN",
                ));
            }
        };
        let signer = Signer::from_parts(cert.clone(), key, what)?;
        Ok(Issuer {
            id,
            cert,
            cert_pem,
            not_after: info.not_after,
            signer,
        })
    }

    /// The instance this issuer belongs to (`spiffe://<td>/ecsmesh/instance/<name>`).
    pub fn instance_id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    fn signer(&self) -> &Signer {
        &self.signer
    }

    /// Issues an X.509-SVID for `id`, valid from now (whole seconds) for `lifetime`, but
    /// never beyond the issuer itself: a leaf outliving its issuer would fail anyway.
    /// Only identities of the issuer's own trust domain are issued.
    pub fn issue_svid(&self, id: &SpiffeId, lifetime: Duration) -> Result<Svid, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = self.make_leaf(id, &key, lifetime)?;
        Svid::from_chain(
            id.clone(),
            vec![leaf.der().clone(), self.cert.clone()],
            &key,
        )
    }

    /// Like [`Issuer::issue_svid`], for a key made elsewhere (the public key of a CSR):
    /// returns the chain, leaf then issuer. The same leaf as `issue_svid` makes.
    pub fn issue_for_key(
        &self,
        id: &SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let leaf = self.make_leaf(id, public_key, lifetime)?;
        Ok(vec![leaf.der().clone(), self.cert.clone()])
    }

    /// The one leaf-making path: checks, validity (capped at the issuer's), params, sign.
    fn make_leaf(
        &self,
        id: &SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<rcgen::Certificate, IdentityError> {
        if lifetime < Duration::from_secs(1) {
            return Err(IdentityError::LifetimeTooShort);
        }
        if id.trust_domain() != self.id.trust_domain() {
            return Err(IdentityError::ForeignTrustDomain {
                id: id.clone(),
                expected: self.id.trust_domain().clone(),
            });
        }
        let not_before = now_secs();
        let cap = time::OffsetDateTime::from(self.not_after);
        let not_after = (not_before + to_time(Duration::from_secs(lifetime.as_secs()))?).min(cap);
        let params = leaf_params(&[id.to_string()], not_before, not_after)?;
        self.signer.sign(params, public_key)
    }
}

/// An X.509-SVID with its key, ready for rustls.
#[derive(Clone)]
pub struct Svid {
    pub id: SpiffeId,
    /// Leaf, then issuer.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Serial number of the leaf, lowercase hex.
    pub serial: String,
    certified: std::sync::Arc<rustls::sign::CertifiedKey>,
}

impl std::fmt::Debug for Svid {
    // Hand-written so the key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// An SVID from a chain made elsewhere (the issuer) for a key made here.
    pub fn from_chain(
        id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: &KeyPair,
    ) -> Result<Svid, IdentityError> {
        let leaf = chain
            .first()
            .ok_or_else(|| IdentityError::invalid("SVID", "empty chain"))?;
        let info = CertInfo::parse(leaf).map_err(|r| IdentityError::invalid("SVID", r))?;
        let key_der = rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let certified = rustls::sign::CertifiedKey::from_der(
            chain.clone(),
            key_der.into(),
            &super::provider(),
        )?;
        Ok(Svid {
            id,
            chain,
            not_before: info.not_before,
            not_after: info.not_after,
            serial: info.serial,
            certified: std::sync::Arc::new(certified),
        })
    }

    pub fn certified_key(&self) -> std::sync::Arc<rustls::sign::CertifiedKey> {
        self.certified.clone()
    }

    /// Half-way through the validity: time enough to retry a failed refresh many times
    /// before peers start rejecting the old certificate.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life / 2
    }
}
