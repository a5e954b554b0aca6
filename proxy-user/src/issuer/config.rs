//! `issuer.toml`, parsed once into typed values.
//!
//! ```toml
//! listen = "0.0.0.0:8443"
//! admin_addr = "127.0.0.1:9090"          # optional: /metrics and /ready, plain HTTP
//! trust_domain = "mesh.example"
//! cluster = "prod"
//! template = "spiffe://{trust_domain}/ecs/{cluster}/{family}"   # default
//! svid_lifetime_secs = 3600               # default
//! node_cert_lifetime_secs = 3600          # default
//! bundle = "/etc/ecsmesh/bundle.pem"
//! ca_dir = "/etc/ecsmesh/issuer"          # or: ca_secret = "ecsmesh/issuer-ca"
//! iid_certificates = ["/etc/ecsmesh/aws-eu-west-1.pem"]
//! state_file = "/var/lib/ecsmesh/issuer-state.json"
//! denied_instances = []
//! # aws_endpoint = "http://127.0.0.1:5000"  # tests: moto
//! # region = "eu-west-1"
//! # sts_url = "https://sts.eu-west-1.amazonaws.com"  # task-role attestation (sidecars):
//! #                                 # default from region; off with neither
//! ```
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    config::ConfigError,
    identity::{
        DEFAULT_TEMPLATE, IdentityTemplate, TemplateVars, TrustDomain,
        protocol::{self, RESERVED_PREFIX},
    },
};

pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// Where the issuing CA's certificate and key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// A directory with `issuer.pem` and `issuer.key` (`ecsmesh ca issue-intermediate
    /// --instance issuer --out DIR`), reloaded when they change and on SIGHUP.
    Dir(PathBuf),
    /// An AWS Secrets Manager secret whose SecretString is
    /// `{"certificate": PEM, "private_key": PEM}`, re-read on SIGHUP.
    Secret(String),
}

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub listen: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub trust_domain: TrustDomain,
    pub cluster: String,
    pub template: IdentityTemplate,
    pub svid_lifetime: Duration,
    pub node_cert_lifetime: Duration,
    pub bundle: PathBuf,
    pub ca: CaSource,
    pub aws_endpoint: Option<String>,
    pub region: Option<String>,
    /// Task-role attestation (`/v1/task`) forwards to this STS endpoint; off when None.
    pub sts_url: Option<http::Uri>,
    pub iid_certificates: Vec<PathBuf>,
    pub state_file: PathBuf,
    pub denied_instances: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: SocketAddr,
    admin_addr: Option<SocketAddr>,
    trust_domain: String,
    cluster: String,
    template: Option<String>,
    svid_lifetime_secs: Option<u64>,
    node_cert_lifetime_secs: Option<u64>,
    bundle: PathBuf,
    ca_dir: Option<PathBuf>,
    ca_secret: Option<String>,
    aws_endpoint: Option<String>,
    region: Option<String>,
    sts_url: Option<String>,
    iid_certificates: Vec<PathBuf>,
    state_file: PathBuf,
    #[serde(default)]
    denied_instances: Vec<String>,
}

impl IssuerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        crate::config::load_toml(path, Raw::validate)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        crate::config::parse_toml(path, text, Raw::validate)
    }
}

impl Raw {
    fn validate(self) -> Result<IssuerConfig, (&'static str, String)> {
        let trust_domain =
            TrustDomain::new(&self.trust_domain).map_err(|e| ("trust_domain", e.to_string()))?;
        if self.cluster.is_empty() {
            return Err(("cluster", "must not be empty".into()));
        }
        let template = IdentityTemplate::new(self.template.as_deref().unwrap_or(DEFAULT_TEMPLATE))
            .map_err(|e| ("template", e.to_string()))?;
        check_template(&template, &trust_domain, &self.cluster)
            .map_err(|message| ("template", message))?;
        let lifetime = |field, v: Option<u64>| match v {
            None => Ok(DEFAULT_LIFETIME),
            // Seconds-long lifetimes are for tests (lapse and rotation within a test run).
            Some(s) if s >= 1 => Ok(Duration::from_secs(s)),
            Some(_) => Err((field, "must be at least 1 second".to_owned())),
        };
        let svid_lifetime = lifetime("svid_lifetime_secs", self.svid_lifetime_secs)?;
        let node_cert_lifetime = lifetime("node_cert_lifetime_secs", self.node_cert_lifetime_secs)?;
        let ca = match (self.ca_dir, self.ca_secret) {
            (Some(dir), None) => CaSource::Dir(dir),
            (None, Some(id)) if !id.is_empty() => CaSource::Secret(id),
            (None, Some(_)) => return Err(("ca_secret", "must not be empty".into())),
            _ => {
                return Err((
                    "ca_dir",
                    "exactly one of ca_dir and ca_secret must be set".into(),
                ));
            }
        };
        if self.iid_certificates.is_empty() {
            return Err((
                "iid_certificates",
                "at least one AWS certificate for instance identity documents is needed".into(),
            ));
        }
        for id in &self.denied_instances {
            if !is_instance_id(id) {
                return Err((
                    "denied_instances",
                    format!("{id:?} is not an EC2 instance id (i-…)"),
                ));
            }
        }
        let sts_url = match (&self.sts_url, &self.region) {
            (Some(u), _) => Some(u.clone()),
            (None, Some(r)) => Some(format!("https://sts.{r}.amazonaws.com")),
            (None, None) => None,
        };
        let sts_url = sts_url
            .map(|u| {
                let uri: http::Uri = u.parse().map_err(|e| ("sts_url", format!("{u:?}: {e}")))?;
                if uri.host().is_none()
                    || uri.path() != "/"
                    || !matches!(uri.scheme_str(), Some("https" | "http"))
                {
                    return Err(("sts_url", format!("{u:?}: want http(s)://host[:port]")));
                }
                Ok(uri)
            })
            .transpose()?;
        Ok(IssuerConfig {
            listen: self.listen,
            admin_addr: self.admin_addr,
            trust_domain,
            cluster: self.cluster,
            template,
            svid_lifetime,
            node_cert_lifetime,
            bundle: self.bundle,
            ca,
            aws_endpoint: self.aws_endpoint,
            region: self.region,
            sts_url,
            iid_certificates: self.iid_certificates,
            state_file: self.state_file,
            denied_instances: self.denied_instances,
        })
    }
}

/// The template must name workloads of this trust domain, outside the mesh's reserved
/// `/ecsmesh/` paths (a task must never get a node's or the issuer's identity).
fn check_template(tpl: &IdentityTemplate, td: &TrustDomain, cluster: &str) -> Result<(), String> {
    let sample = TemplateVars {
        trust_domain: td.clone(),
        cluster: cluster.to_owned(),
        family: "family".into(),
        service: Some("service".into()),
        task_role: Some("role".into()),
    };
    let id = tpl.render(&sample).map_err(|e| e.to_string())?;
    crate::issuer::service::check_workload_id(&id, td).map_err(|r| r.message)?;
    debug_assert!(protocol::issuer_id(td).path().starts_with(RESERVED_PREFIX));
    Ok(())
}

/// `i-` and 8 or 17 lowercase hex digits, as EC2 names instances.
pub fn is_instance_id(s: &str) -> bool {
    s.strip_prefix("i-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
listen = "127.0.0.1:8443"
trust_domain = "mesh.test"
cluster = "prod"
bundle = "/b.pem"
ca_dir = "/ca"
iid_certificates = ["/aws.pem"]
state_file = "/state.json"
"#;

    #[test]
    fn defaults_and_errors() {
        let c = IssuerConfig::parse(Path::new("t"), BASE).unwrap();
        assert_eq!(c.svid_lifetime, DEFAULT_LIFETIME);
        assert_eq!(c.template.as_str(), DEFAULT_TEMPLATE);
        assert_eq!(c.ca, CaSource::Dir("/ca".into()));
        let both = format!("{BASE}ca_secret = \"x\"\n");
        let e = IssuerConfig::parse(Path::new("t"), &both).unwrap_err();
        assert!(e.to_string().contains("exactly one"), "{e}");
        let reserved = format!("{BASE}template = \"spiffe://{{trust_domain}}/ecsmesh/node/x\"\n");
        let e = IssuerConfig::parse(Path::new("t"), &reserved).unwrap_err();
        assert!(e.to_string().contains("template"), "{e}");
        let foreign = format!("{BASE}template = \"spiffe://other.test/{{family}}\"\n");
        assert!(IssuerConfig::parse(Path::new("t"), &foreign).is_err());
        let deny = format!("{BASE}denied_instances = [\"i-xyz\"]\n");
        assert!(IssuerConfig::parse(Path::new("t"), &deny).is_err());
        let unknown = format!("{BASE}bogus = 1\n");
        assert!(IssuerConfig::parse(Path::new("t"), &unknown).is_err());
        assert!(is_instance_id("i-0123456789abcdef0"));
        assert!(is_instance_id("i-01234567"));
        assert!(!is_instance_id("i-0123456789ABCDEF0"));
        assert!(!is_instance_id("i-../../x"));
    }
}
