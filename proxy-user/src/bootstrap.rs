//! `ecsmesh bootstrap`: writes a container instance's node config from its instance
//! metadata and the stack's parameters, so the EC2 user data stays a few lines and the
//! logic is tested here.
//!
//! It reads the instance identity document over IMDSv2 (the same client the node uses
//! to attest, `identity::remote::imds_get`), takes the instance id and (unless
//! `--region` is given) the region from it, and writes a complete issuer-mode config:
//! top-level `instance`, `cluster`, `cgroup_root`, `bridge_ipv4`; `[identity]`; `[ecs]`
//! with the ready attribute; `[cloudmap]` when a namespace is given. Before anything is
//! written the text goes through the node's own parser ([`Config::parse`], what `ecsmesh
//! check-config` runs), so a bad flag fails here, naming the flag and the config field,
//! and never reaches the proxy. The file is replaced atomically (0644: it holds no secret).
//!
//! With `--sidecar-out` it also writes the config every `ecsmesh sidecar` container on the
//! instance reads (the same for all tasks: each sidecar learns its own task from the ECS
//! task metadata endpoint and proves it with its task role; nothing is per task).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, ConfigError},
    identity::{self, IdentityError, remote::imds_get},
};

/// The instance identity document (JSON with `instanceId`, `region`).
const IDENTITY_DOCUMENT_PATH: &str = "/latest/dynamic/instance-identity/document";

/// The docker0 bridge of ECS-optimized AMIs: bridge-mode tasks reach the proxy there.
pub const DOCKER_BRIDGE_IPV4: &str = "172.17.0.1";

/// `ecsmesh bootstrap` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BootstrapArgs {
    /// ECS cluster name (`cluster`; part of identities).
    #[arg(long)]
    pub cluster: String,
    /// SPIFFE trust domain (`identity.trust_domain`).
    #[arg(long)]
    pub trust_domain: String,
    /// `https://host:port` of `ecsmesh issuer` (`identity.issuer_url`).
    #[arg(long)]
    pub issuer_url: String,
    /// Identity template (`identity.template`); default: the node's default.
    #[arg(long)]
    pub template: Option<String>,
    /// Cloud Map namespace of the meshed services (`[cloudmap]`; needs --cloudmap-service).
    #[arg(long, requires = "cloudmap_service")]
    pub cloudmap_namespace: Option<String>,
    /// Cloud Map service to discover; repeat it or separate names with commas.
    #[arg(long, value_delimiter = ',', requires = "cloudmap_namespace")]
    pub cloudmap_service: Vec<String>,
    /// AWS region for ECS and Cloud Map calls; default: the identity document's.
    #[arg(long)]
    pub region: Option<String>,
    /// cgroup v2 directory the programs attach to (`cgroup_root`), as the proxy sees it.
    #[arg(long, default_value = "/sys/fs/cgroup/ecstasks.slice")]
    pub cgroup_root: PathBuf,
    /// The host's cgroup filesystem root as the proxy sees it (`ecs.cgroup_root`), e.g.
    /// `/host/sys/fs/cgroup` in the daemon task.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub ecs_cgroup_root: PathBuf,
    /// Trust bundle (PEM anchors) given to the node (`identity.bundle`); must exist.
    #[arg(long, default_value = "/etc/ecsmesh/bundle.pem")]
    pub bundle: PathBuf,
    /// Instance metadata service (`identity.imds_url`, and where this command reads).
    #[arg(long, default_value = "http://169.254.169.254")]
    pub imds_url: String,
    /// Where the config is written.
    #[arg(long, default_value = "/etc/ecsmesh/config.toml")]
    pub out: PathBuf,
    /// Docker Engine API socket as the proxy sees it (`ecs.docker_socket`: health gating).
    #[arg(long, default_value = "/var/run/docker.sock")]
    pub docker_socket: PathBuf,
    /// Also write the sidecars' config here (`ecsmesh sidecar` in awsvpc tasks).
    #[arg(long)]
    pub sidecar_out: Option<PathBuf>,
    /// The host's cgroup filesystem as a sidecar container mounts it (its `cgroup_root`).
    #[arg(long, default_value = "/host/sys/fs/cgroup")]
    pub sidecar_cgroup_root: PathBuf,
    /// bpffs directory below which each sidecar pins (one directory per task).
    #[arg(long, default_value = "/sys/fs/bpf/ecsmesh-sidecars")]
    pub sidecar_pin_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("--imds-url: {url:?}: {message}")]
    ImdsUrl { url: String, message: String },
    #[error("reading the instance identity document from IMDS at {url}: {message}")]
    Imds { url: String, message: String },
    #[error("instance identity document from {url}: {message}")]
    Document { url: String, message: String },
    /// The node's parser refused the config these flags make.
    #[error("{flag}: {source}")]
    Rejected { flag: String, source: ConfigError },
    #[error("rendering the config: {0}")]
    Render(#[from] toml::ser::Error),
    /// The error names the file.
    #[error("writing the config: {0}")]
    Write(IdentityError),
}

/// What the identity document says that the config needs.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    instance_id: String,
    region: String,
}

/// The config as written: scalars before tables, `None` left out.
#[derive(Debug, Serialize)]
struct NodeFile {
    instance: String,
    cluster: String,
    cgroup_root: PathBuf,
    bridge_ipv4: &'static str,
    identity: IdentityFile,
    ecs: EcsFile,
    #[serde(skip_serializing_if = "Option::is_none")]
    cloudmap: Option<CloudMapFile>,
}

#[derive(Debug, Serialize)]
struct IdentityFile {
    trust_domain: String,
    bundle: PathBuf,
    issuer_url: String,
    imds_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<String>,
}

/// The sidecars' config: no `[ecs]` (a sidecar serves its own task only), task-role
/// attestation.
#[derive(Debug, Serialize)]
struct SidecarFile {
    instance: String,
    cluster: String,
    cgroup_root: PathBuf,
    pin_dir: PathBuf,
    identity: SidecarIdentityFile,
    #[serde(skip_serializing_if = "Option::is_none")]
    cloudmap: Option<CloudMapFile>,
}

#[derive(Debug, Serialize)]
struct SidecarIdentityFile {
    trust_domain: String,
    bundle: PathBuf,
    issuer_url: String,
    attestation: &'static str,
    region: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<String>,
}

#[derive(Debug, Serialize)]
struct EcsFile {
    docker_socket: PathBuf,
    cgroup_root: PathBuf,
    publish_ready_attribute: bool,
    region: String,
}

#[derive(Debug, Serialize)]
struct CloudMapFile {
    namespace: String,
    services: Vec<String>,
    region: String,
}

/// The CLI entry: one IMDS read on a small runtime, then [`bootstrap`].
pub fn run(args: BootstrapArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let config = runtime.block_on(bootstrap(&args))?;
    tracing::info!(
        out = %args.out.display(),
        instance = %config.instance,
        cluster = %config.cluster,
        "node config written"
    );
    Ok(())
}

/// Reads IMDS, renders, validates with the node's parser, writes `args.out`; returns the
/// config as the proxy will load it.
pub async fn bootstrap(args: &BootstrapArgs) -> Result<Config, BootstrapError> {
    let imds: http::Uri =
        args.imds_url
            .parse()
            .map_err(|e: http::uri::InvalidUri| BootstrapError::ImdsUrl {
                url: args.imds_url.clone(),
                message: e.to_string(),
            })?;
    let text = imds_get(&imds, &[IDENTITY_DOCUMENT_PATH])
        .await
        .and_then(|mut bodies| bodies.pop().ok_or_else(|| "no answer".to_owned()))
        .map_err(|message| BootstrapError::Imds {
            url: args.imds_url.clone(),
            message,
        })?;
    let doc: Document = serde_json::from_str(&text).map_err(|e| BootstrapError::Document {
        url: format!(
            "{}{}",
            args.imds_url.trim_end_matches('/'),
            IDENTITY_DOCUMENT_PATH
        ),
        message: e.to_string(),
    })?;
    let sidecar = match &args.sidecar_out {
        Some(out) => {
            let text = render_sidecar(args, &doc)?;
            Config::parse(out, &text).map_err(|source| BootstrapError::Rejected {
                flag: match flag_of(&source) {
                    "--cgroup-root" => "--sidecar-out: --sidecar-cgroup-root".to_owned(),
                    other => format!("--sidecar-out: {other}"),
                },
                source,
            })?;
            Some((out, text))
        }
        None => None,
    };
    let text = render(args, doc)?;
    let config = Config::parse(&args.out, &text).map_err(|source| BootstrapError::Rejected {
        flag: flag_of(&source).to_owned(),
        source,
    })?;
    write(&args.out, &text)?;
    if let Some((out, text)) = sidecar {
        write(out, &text)?;
    }
    Ok(config)
}

fn render_sidecar(args: &BootstrapArgs, doc: &Document) -> Result<String, BootstrapError> {
    let region = args.region.clone().unwrap_or_else(|| doc.region.clone());
    let file = SidecarFile {
        instance: doc.instance_id.clone(),
        cluster: args.cluster.clone(),
        cgroup_root: args.sidecar_cgroup_root.clone(),
        pin_dir: args.sidecar_pin_dir.clone(),
        identity: SidecarIdentityFile {
            trust_domain: args.trust_domain.clone(),
            bundle: args.bundle.clone(),
            issuer_url: args.issuer_url.clone(),
            attestation: "task_role",
            region: region.clone(),
            template: args.template.clone(),
        },
        cloudmap: args.cloudmap_namespace.as_ref().map(|ns| CloudMapFile {
            namespace: ns.clone(),
            services: args.cloudmap_service.clone(),
            region,
        }),
    };
    let body = toml::to_string(&file)?;
    Ok(format!(
        "# Written by `ecsmesh bootstrap` at boot for every `ecsmesh sidecar` on this \
         instance; edits are lost at the next boot.\n{body}"
    ))
}

fn render(args: &BootstrapArgs, doc: Document) -> Result<String, BootstrapError> {
    let region = args.region.clone().unwrap_or(doc.region);
    let cloudmap = args.cloudmap_namespace.as_ref().map(|ns| CloudMapFile {
        namespace: ns.clone(),
        services: args.cloudmap_service.clone(),
        region: region.clone(),
    });
    let file = NodeFile {
        instance: doc.instance_id,
        cluster: args.cluster.clone(),
        cgroup_root: args.cgroup_root.clone(),
        bridge_ipv4: DOCKER_BRIDGE_IPV4,
        identity: IdentityFile {
            trust_domain: args.trust_domain.clone(),
            bundle: args.bundle.clone(),
            issuer_url: args.issuer_url.clone(),
            imds_url: args.imds_url.clone(),
            template: args.template.clone(),
        },
        ecs: EcsFile {
            docker_socket: args.docker_socket.clone(),
            cgroup_root: args.ecs_cgroup_root.clone(),
            publish_ready_attribute: true,
            region,
        },
        cloudmap,
    };
    let body = toml::to_string(&file)?;
    Ok(format!(
        "# Written by `ecsmesh bootstrap` at boot; edits are lost at the next boot.\n{body}"
    ))
}

/// The flag behind a config field the parser refused (the instance id comes from IMDS).
fn flag_of(e: &ConfigError) -> &'static str {
    let ConfigError::Invalid { field, .. } = e else {
        return "the rendered config";
    };
    let field = field.split('[').next().unwrap_or(field);
    match field {
        "instance" => "the instance id from IMDS",
        "cluster" => "--cluster",
        "cgroup_root" => "--cgroup-root",
        "identity.trust_domain" | "identity.allowed_trust_domains" => "--trust-domain",
        "identity.bundle" => "--bundle",
        "identity.issuer_url" => "--issuer-url",
        "identity.imds_url" => "--imds-url",
        "identity.template" => "--template",
        "ecs.cgroup_root" | "ecs.layout" => "--ecs-cgroup-root",
        "ecs.docker_socket" => "--docker-socket",
        "ecs.region" | "cloudmap.region" => "--region",
        "cloudmap.namespace" | "cloudmap" => "--cloudmap-namespace",
        "cloudmap.services" => "--cloudmap-service",
        _ => "the rendered config",
    }
}

fn write(path: &Path, text: &str) -> Result<(), BootstrapError> {
    let fail = BootstrapError::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| fail(IdentityError::io(dir, e)))?;
    }
    identity::write_atomic(path, text.as_bytes(), identity::PUBLIC_MODE).map_err(fail)
}

#[cfg(test)]
mod tests;
