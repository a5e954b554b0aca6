//! `[identity]`: the trust bundle and where SVIDs come from (a CA directory on the node,
//! or `ecsmesh issuer`).
use std::path::PathBuf;

use serde::Deserialize;

use super::{
    IdentitySettings, IdentitySource,
    raw::{Invalid, invalid},
};
use crate::identity::{DEFAULT_TEMPLATE, IdentityTemplate, TrustDomain};

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
    #[serde(default)]
    svid_lifetime_secs: Option<u64>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    allowed_trust_domains: Option<Vec<String>>,
}

/// AWS's instance metadata service.
const DEFAULT_IMDS_URL: &str = "http://169.254.169.254";

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
                if self.imds_url.is_some() {
                    return Err(invalid("identity.imds_url", "only with issuer_url"));
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
                let imds = url(
                    "identity.imds_url",
                    self.imds_url.as_deref().unwrap_or(DEFAULT_IMDS_URL),
                )?;
                if imds.scheme_str() != Some("http") {
                    return Err(invalid("identity.imds_url", "must be http://"));
                }
                IdentitySource::Issuer {
                    url: issuer,
                    imds_url: imds,
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
