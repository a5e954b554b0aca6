//! `[identity]`: the trust bundle and where SVIDs come from (a CA directory on the node,
//! or `ecsmesh issuer`).
use std::path::PathBuf;

use serde::Deserialize;

use super::{
    IdentitySettings, IdentitySource,
    raw::{Invalid, invalid},
};
use crate::identity::{
    DEFAULT_TEMPLATE, IdentityTemplate, TrustDomain,
    remote::{Attestation, TaskRoleConfig},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    trust_domain: String,
    bundle: PathBuf,
    #[serde(default)]
    issuer_dir: Option<PathBuf>,
    #[serde(default)]
    issuer_url: Option<String>,
    #[serde(default)]
    imds_url: Option<String>,
    /// `instance` (a node, the default) or `task_role` (a sidecar).
    #[serde(default)]
    attestation: Option<String>,
    #[serde(default)]
    sts_url: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    credentials_url: Option<String>,
    #[serde(default)]
    svid_lifetime_secs: Option<u64>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    allowed_trust_domains: Option<Vec<String>>,
}

/// AWS's instance metadata service.
const DEFAULT_IMDS_URL: &str = "http://169.254.169.254";

/// `attestation` and the fields that go with it.
fn attestation(
    kind: Option<&str>,
    imds_url: Option<&str>,
    sts_url: Option<&str>,
    region: Option<String>,
    credentials_url: Option<&str>,
    url: impl Fn(&str, &str) -> Result<http::Uri, Invalid>,
) -> Result<Attestation, Invalid> {
    match kind.unwrap_or("instance") {
        "instance" => {
            for (field, set) in [
                ("identity.sts_url", sts_url.is_some()),
                ("identity.region", region.is_some()),
                ("identity.credentials_url", credentials_url.is_some()),
            ] {
                if set {
                    return Err(invalid(field, "only with attestation = \"task_role\""));
                }
            }
            let imds = url("identity.imds_url", imds_url.unwrap_or(DEFAULT_IMDS_URL))?;
            if imds.scheme_str() != Some("http") {
                return Err(invalid("identity.imds_url", "must be http://"));
            }
            Ok(Attestation::Instance { imds_url: imds })
        }
        "task_role" => {
            if imds_url.is_some() {
                return Err(invalid(
                    "identity.imds_url",
                    "a task_role attestation does not use IMDS",
                ));
            }
            let region = region.filter(|r| !r.is_empty()).ok_or_else(|| {
                invalid(
                    "identity.region",
                    "task_role attestation signs for one region's STS: set region",
                )
            })?;
            let default_sts = format!("https://sts.{region}.amazonaws.com");
            let sts_url = url("identity.sts_url", sts_url.unwrap_or(&default_sts))?;
            let credentials_url = credentials_url
                .map(|c| {
                    c.parse::<http::Uri>()
                        .map_err(|e| invalid("identity.credentials_url", format!("{c:?}: {e}")))
                })
                .transpose()?;
            Ok(Attestation::TaskRole(Box::new(TaskRoleConfig {
                sts_url,
                region,
                credentials_url,
            })))
        }
        other => Err(invalid(
            "identity.attestation",
            format!("{other:?}: want \"instance\" (a node) or \"task_role\" (a sidecar)"),
        )),
    }
}

impl RawIdentity {
    pub(super) fn validate(self) -> Result<IdentitySettings, Invalid> {
        let trust_domain = TrustDomain::new(&self.trust_domain)
            .map_err(|e| invalid("identity.trust_domain", e.to_string()))?;
        let lifetime = self.svid_lifetime_secs.unwrap_or(24 * 3600);
        if lifetime == 0 {
            return Err(invalid("identity.svid_lifetime_secs", "must be at least 1"));
        }
        let allowed_trust_domains = match self.allowed_trust_domains {
            None => vec![trust_domain.clone()],
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    TrustDomain::new(s).map_err(|e| {
                        invalid(
                            format!("identity.allowed_trust_domains[{i}]"),
                            e.to_string(),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        if !self.bundle.exists() {
            return Err(invalid(
                "identity.bundle",
                format!("{}: not found", self.bundle.display()),
            ));
        }
        let url = |field: &str, text: &str| -> Result<http::Uri, Invalid> {
            let uri: http::Uri = text
                .parse()
                .map_err(|e| invalid(field, format!("{text:?}: {e}")))?;
            if uri.host().is_none() || uri.path() != "/" {
                return Err(invalid(
                    field,
                    format!("{text:?}: want scheme://host[:port]"),
                ));
            }
            Ok(uri)
        };
        let source = match (self.issuer_dir, self.issuer_url) {
            (Some(dir), None) => {
                for (field, set) in [
                    ("identity.imds_url", self.imds_url.is_some()),
                    ("identity.attestation", self.attestation.is_some()),
                    ("identity.sts_url", self.sts_url.is_some()),
                    ("identity.region", self.region.is_some()),
                    ("identity.credentials_url", self.credentials_url.is_some()),
                ] {
                    if set {
                        return Err(invalid(field, "only with issuer_url"));
                    }
                }
                if !dir.exists() {
                    return Err(invalid(
                        "identity.issuer_dir",
                        format!("{}: not found", dir.display()),
                    ));
                }
                IdentitySource::IssuerDir(dir)
            }
            (None, Some(u)) => {
                let issuer = url("identity.issuer_url", &u)?;
                if issuer.scheme_str() != Some("https") {
                    return Err(invalid("identity.issuer_url", "must be https://"));
                }
                IdentitySource::Issuer {
                    url: issuer,
                    attestation: attestation(
                        self.attestation.as_deref(),
                        self.imds_url.as_deref(),
                        self.sts_url.as_deref(),
                        self.region,
                        self.credentials_url.as_deref(),
                        url,
                    )?,
                }
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "identity.issuer_url",
                    "set issuer_dir (a CA key on this node) or issuer_url (ecsmesh issuer), not both",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "identity",
                    "needs issuer_url (ecsmesh issuer) or issuer_dir (a CA key on this node)",
                ));
            }
        };
        Ok(IdentitySettings {
            trust_domain,
            bundle: self.bundle,
            source,
            svid_lifetime: std::time::Duration::from_secs(lifetime),
            template: IdentityTemplate::new(self.template.as_deref().unwrap_or(DEFAULT_TEMPLATE))
                .map_err(|e| invalid("identity.template", e.to_string()))?,
            allowed_trust_domains,
        })
    }
}
