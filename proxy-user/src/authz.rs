//! Authorization of tunnelled connections at the destination: which source identities may
//! reach which local task families and ports. With no rules, every identity that passed
//! verification (hence is in an allowed trust domain) may connect.
use serde::Deserialize;

use crate::identity::SpiffeId;

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// Exact SPIFFE ID, or a prefix ending in `*` (`spiffe://td/ecs/prod/*`).
    pub source: String,
    /// Destination task family; any when absent.
    #[serde(default)]
    pub destination_family: Option<String>,
    /// Destination port; any when absent.
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Policy {
    pub allow: Vec<AllowRule>,
}

impl AllowRule {
    fn matches(&self, source: &SpiffeId, family: &str, port: u16) -> bool {
        let id = source.to_string();
        let source_ok = match self.source.strip_suffix('*') {
            Some(prefix) => id.starts_with(prefix),
            None => id == self.source,
        };
        source_ok
            && self
                .destination_family
                .as_deref()
                .is_none_or(|f| f == family)
            && self.port.is_none_or(|p| p == port)
    }
}

impl Policy {
    pub fn allows(&self, source: &SpiffeId, family: &str, port: u16) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|r| r.matches(source, family, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn rules_match_source_family_and_port() {
        let p = Policy {
            allow: vec![
                AllowRule {
                    source: "spiffe://td/ecs/c/web".into(),
                    destination_family: Some("orders".into()),
                    port: Some(8080),
                },
                AllowRule {
                    source: "spiffe://td/ecs/ops/*".into(),
                    destination_family: None,
                    port: None,
                },
            ],
        };
        assert!(p.allows(&id("spiffe://td/ecs/c/web"), "orders", 8080));
        assert!(!p.allows(&id("spiffe://td/ecs/c/web"), "orders", 9090));
        assert!(!p.allows(&id("spiffe://td/ecs/c/web"), "billing", 8080));
        assert!(!p.allows(&id("spiffe://td/ecs/c/webx"), "orders", 8080));
        assert!(p.allows(&id("spiffe://td/ecs/ops/debug"), "billing", 1));
        assert!(Policy::default().allows(&id("spiffe://td/x"), "any", 1));
    }
}
