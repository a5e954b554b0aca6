//! `ecsmesh ca ...`: the operator's side of the identity hierarchy (create the CA, issue
//! instance issuers, rotate and retire anchors) plus arbitrary leaves for tests and
//! debugging. One summary line per action on stdout, so scripts can log it.
//!
//! Anchor rotation is three commands — `rotate` (stage), `activate`, `retire` — and the
//! last two check the nodes first (see [`rollout`]).
mod rollout;

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use crate::identity::{
    Ca, IdentityError, LeafSpec, TrustDomain,
    ca::{AnchorRole, ISSUER_CERT_FILE, RotationError, instance_id},
};
pub use rollout::NodeUrl;

/// Without `--node`, `activate` waits this long after `rotate`: far longer than a node's
/// file-watch reload (200 ms), and time for an out-of-band copy of the bundle to land.
pub const DEFAULT_MIN_STAGED: Duration = Duration::from_secs(300);

/// Everything `ecsmesh ca` can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CaCliError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Rotation(#[from] RotationError),
    #[error("refusing to {step}: {problems} (--force skips this check)")]
    NodesNotReady {
        step: &'static str,
        problems: String,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CaCommand {
    /// Create a CA directory with one trust anchor.
    Init {
        #[arg(long)]
        trust_domain: String,
        /// CA directory to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue (or re-issue) the issuer of one container instance.
    IssueIntermediate {
        #[arg(long)]
        ca: PathBuf,
        /// Instance name; becomes spiffe://<td>/ecsmesh/instance/<name>.
        #[arg(long)]
        instance: String,
        /// Directory for bundle.pem, issuer.pem and issuer.key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Rotation step 1: stage a new trust anchor. It joins every bundle; nothing signs
    /// with it until `activate`.
    Rotate {
        #[arg(long)]
        ca: PathBuf,
    },
    /// Rotation step 2: re-issue every instance issuer under the staged anchor. Refused
    /// unless every `--node` trusts the staged anchor (or, without `--node`, unless it was
    /// staged at least `--min-staged-secs` ago).
    Activate {
        #[arg(long)]
        ca: PathBuf,
        /// A node proxy's admin base URL (http://host:port); repeat for every node.
        #[arg(long = "node")]
        nodes: Vec<NodeUrl>,
        /// Minimum time since `rotate` [default: 300 without --node, 0 with it].
        #[arg(long)]
        min_staged_secs: Option<u64>,
        /// Skip the node and time checks.
        #[arg(long)]
        force: bool,
    },
    /// Rotation step 3: drop every anchor but the active one from all bundles. Refused
    /// unless every `--node` signs under the active anchor.
    Retire {
        #[arg(long)]
        ca: PathBuf,
        /// A node proxy's admin base URL (http://host:port); repeat for every node.
        #[arg(long = "node")]
        nodes: Vec<NodeUrl>,
        /// Skip the node check.
        #[arg(long)]
        force: bool,
    },
    /// Show the anchors (active, staged, old) with their SHA-256 fingerprints and, with
    /// `--node`, what each node trusts and signs with.
    Status {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long = "node")]
        nodes: Vec<NodeUrl>,
    },
    /// Issue an arbitrary leaf certificate (tests, debugging).
    Issue {
        #[arg(long)]
        ca: PathBuf,
        /// Sign with this instance issuer (a certificate nodes accept). Without it the
        /// active anchor signs the leaf itself, which every node refuses
        /// (`issued_by_anchor`): for testing that refusal.
        #[arg(long)]
        issuer: Option<PathBuf>,
        /// URI SAN; repeat for several.
        #[arg(long)]
        uri: Vec<String>,
        #[arg(long, default_value_t = 86400)]
        lifetime_secs: u64,
        #[arg(long, default_value_t = 0)]
        not_before_secs_ago: u64,
        #[arg(long)]
        self_signed: bool,
        #[arg(long)]
        out_cert: PathBuf,
        #[arg(long)]
        out_key: PathBuf,
    },
}

pub fn run(cmd: CaCommand) -> Result<(), CaCliError> {
    match cmd {
        CaCommand::Init { trust_domain, out } => {
            let ca = Ca::init(&out, TrustDomain::new(&trust_domain)?)?;
            println!(
                "created CA for trust domain {} in {} (bundle {})",
                ca.trust_domain(),
                out.display(),
                ca.bundle_path().display()
            );
        }
        CaCommand::IssueIntermediate { ca, instance, out } => {
            let mut ca = Ca::open(&ca)?;
            ca.issue_intermediate(&instance, &out)?;
            println!(
                "issued {} into {}",
                instance_id(ca.trust_domain(), &instance)?,
                out.join(ISSUER_CERT_FILE).display()
            );
        }
        CaCommand::Rotate { ca } => {
            let mut ca = Ca::open(&ca)?;
            let staged = ca.rotate()?;
            println!(
                "staged anchor {staged}: {} anchors in the bundle, {} instance bundles updated, \
                 no issuer changed; next: `ecsmesh ca activate` once every node trusts it",
                ca.anchor_count(),
                ca.instances().len()
            );
        }
        CaCommand::Activate {
            ca,
            nodes,
            min_staged_secs,
            force,
        } => {
            let mut ca = Ca::open(&ca)?;
            let staged = ca.staged()?.ok_or(RotationError::NothingStaged)?;
            let min_staged = if force {
                Duration::ZERO
            } else {
                if !nodes.is_empty() {
                    rollout::check(&nodes, "activate", |n| {
                        (!n.trusts(&staged)).then(|| format!("does not trust anchor {staged} yet"))
                    })?;
                }
                match (min_staged_secs, nodes.is_empty()) {
                    (Some(s), _) => Duration::from_secs(s),
                    (None, true) => DEFAULT_MIN_STAGED,
                    (None, false) => Duration::ZERO,
                }
            };
            let active = ca.activate(min_staged)?;
            println!(
                "activated anchor {active}: {} instance issuers re-issued under it; next: \
                 `ecsmesh ca retire` once every node signs under it",
                ca.instances().len()
            );
        }
        CaCommand::Retire { ca, nodes, force } => {
            let mut ca = Ca::open(&ca)?;
            let active = ca.active_fingerprint()?;
            if !force {
                rollout::check(&nodes, "retire", |n| match &n.issuer {
                    None => Some("has no certificate from an issuer yet".to_owned()),
                    Some(i) => (i.anchor != active).then(|| {
                        format!(
                            "still signs under anchor {} (not the active {active})",
                            i.anchor
                        )
                    }),
                })?;
            }
            let dropped = ca.retire()?;
            println!(
                "retired {} anchors; {} left, {} instance bundles updated",
                dropped.len(),
                ca.anchor_count(),
                ca.instances().len()
            );
        }
        CaCommand::Status { ca, nodes } => {
            let ca = Ca::open(&ca)?;
            for a in ca.anchors(SystemTime::now())? {
                let role = match a.role {
                    AnchorRole::Active => "active".to_owned(),
                    AnchorRole::Staged(d) => format!("staged {} s ago", d.as_secs()),
                    AnchorRole::Old => "old (retire)".to_owned(),
                };
                println!("anchor {} {} {role}", a.number, a.fingerprint);
            }
            for node in &nodes {
                match rollout::fetch(node) {
                    Ok(t) => println!(
                        "node {node}: trusts [{}], issuer {}",
                        t.anchors
                            .iter()
                            .map(|f| f.short())
                            .collect::<Vec<_>>()
                            .join(", "),
                        t.issuer.as_ref().map_or("none yet".to_owned(), |i| format!(
                            "{} under {}",
                            i.identity,
                            i.anchor.short()
                        ))
                    ),
                    Err(e) => println!("node {node}: {e}"),
                }
            }
        }
        CaCommand::Issue {
            ca,
            issuer,
            uri,
            lifetime_secs,
            not_before_secs_ago,
            self_signed,
            out_cert,
            out_key,
        } => {
            let ca = Ca::open(&ca)?;
            let spec = LeafSpec {
                uris: uri,
                lifetime: Duration::from_secs(lifetime_secs),
                not_before_ago: Duration::from_secs(not_before_secs_ago),
                self_signed,
                issuer_dir: issuer,
            };
            let (chain, key) = ca.issue_leaf(&spec)?;
            crate::identity::write_atomic(&out_key, key.as_bytes(), crate::identity::KEY_MODE)?;
            crate::identity::write_atomic(
                &out_cert,
                chain.as_bytes(),
                crate::identity::PUBLIC_MODE,
            )?;
            println!(
                "issued leaf with URIs [{}] valid {lifetime_secs} s into {} (key {})",
                spec.uris.join(", "),
                out_cert.display(),
                out_key.display()
            );
        }
    }
    Ok(())
}
