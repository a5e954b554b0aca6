//! `ecsmesh ca ...`: the operator's side of the identity hierarchy (create the CA, issue
//! instance issuers, rotate and retire anchors) plus arbitrary leaves for tests and
//! debugging. One summary line per action on stdout, so scripts can log it.
use std::{path::PathBuf, time::Duration};

use crate::identity::{
    Ca, IdentityError, LeafSpec, TrustDomain, ca::ISSUER_CERT_FILE, ca::instance_id,
};

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
    /// Add a new trust anchor and re-issue every instance issuer under it.
    Rotate {
        #[arg(long)]
        ca: PathBuf,
    },
    /// Drop every anchor but the active one from all bundles.
    Retire {
        #[arg(long)]
        ca: PathBuf,
    },
    /// Issue an arbitrary leaf certificate (tests, debugging).
    Issue {
        #[arg(long)]
        ca: PathBuf,
        /// Sign with this instance issuer instead of the active anchor.
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

pub fn run(cmd: CaCommand) -> Result<(), IdentityError> {
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
            ca.rotate()?;
            println!(
                "rotated: {} anchors in the bundle, {} instance issuers re-issued",
                ca.anchor_count(),
                ca.instances().len()
            );
        }
        CaCommand::Retire { ca } => {
            let mut ca = Ca::open(&ca)?;
            let dropped = ca.retire()?;
            println!(
                "retired {dropped} anchors; {} left, {} instance bundles updated",
                ca.anchor_count(),
                ca.instances().len()
            );
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
