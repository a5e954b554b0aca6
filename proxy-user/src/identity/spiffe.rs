//! SPIFFE names: trust domains, workload IDs, and the template that turns an ECS task's
//! attributes into its ID. Parsing is strict (the SPIFFE ID spec, workload IDs only)
//! because these strings end up in certificates and authorization rules, where a lenient
//! parser would let two spellings of one identity disagree.
use std::{fmt, str::FromStr};

use super::IdentityError;

/// Longest trust domain the SPIFFE spec allows.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID (as a URI) the SPIFFE spec allows.
const MAX_ID_LEN: usize = 2048;
const SCHEME: &str = "spiffe://";
/// Suffix of the SNI names derived from SPIFFE IDs; never resolved, only matched.
pub const SNI_SUFFIX: &str = ".id.ecsmesh.internal";

/// The default identity of a task: its cluster and task definition family.
pub const DEFAULT_TEMPLATE: &str = "spiffe://{trust_domain}/ecs/{cluster}/{family}";

/// A SPIFFE trust domain (`example.org`): lowercase letters, digits, `.`, `-`, `_`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(s: &str) -> Result<Self, IdentityError> {
        let err = |reason| IdentityError::InvalidTrustDomain {
            input: s.to_owned(),
            reason,
        };
        if s.is_empty() {
            return Err(err("empty"));
        }
        if s.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(err("longer than 255 characters"));
        }
        if !s
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
        {
            return Err(err(
                "only lowercase letters, digits, '.', '-' and '_' are allowed",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A SPIFFE workload ID: `spiffe://<trust domain>/<path>` with a non-empty path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct SpiffeId {
    /// The whole ID; first so that ordering is plain string order.
    full: String,
    trust_domain: TrustDomain,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let err = |reason| IdentityError::InvalidSpiffeId {
            input: s.to_owned(),
            reason,
        };
        if s.len() > MAX_ID_LEN {
            return Err(err("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| err("must start with spiffe://"))?;
        if rest.contains(['?', '#']) {
            return Err(err("query and fragment are not allowed"));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let trust_domain = TrustDomain::new(td).map_err(|_| {
            err("trust domain must be non-empty lowercase letters, digits, '.', '-', '_'")
        })?;
        if path.is_empty() {
            return Err(err("path is empty (a workload ID needs one)"));
        }
        for segment in path[1..].split('/') {
            match segment {
                "" => return Err(err("empty path segment")),
                "." | ".." => return Err(err("'.' and '..' path segments are not allowed")),
                _ if !is_segment(segment) => {
                    return Err(err(
                        "path segments allow only letters, digits, '.', '-' and '_'",
                    ));
                }
                _ => {}
            }
        }
        Ok(Self {
            full: s.to_owned(),
            trust_domain,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, with its leading `/` (`/ecs/prod/orders`).
    pub fn path(&self) -> &str {
        &self.full[SCHEME.len() + self.trust_domain.as_str().len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// A DNS name that stands for this identity in TLS SNI, so a node proxy serving several
    /// identities on one port can pick the SVID a client asks for. SPIFFE IDs are not DNS
    /// names, hence a hash: 128 bits of SHA-256, as 32 hex digits (one DNS label).
    pub fn sni(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.full.as_bytes());
        let mut out = String::with_capacity(32 + SNI_SUFFIX.len());
        for b in &digest.as_ref()[..16] {
            out.push_str(&format!("{b:02x}"));
        }
        out.push_str(SNI_SUFFIX);
        out
    }
}

fn is_segment(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

macro_rules! serde_as_string {
    ($ty:ty, $ctor:path) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $ctor(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(TrustDomain, TrustDomain::new);
serde_as_string!(SpiffeId, SpiffeId::parse);

/// Values a template can use. `service` and `task_role` are optional because not every task
/// has them; a template that uses a missing one fails to render instead of producing an
/// ID with a hole in it. `task_role` is the IAM role *name* (not the ARN).
#[derive(Clone, Debug)]
pub struct TemplateVars {
    pub trust_domain: TrustDomain,
    pub cluster: String,
    pub family: String,
    pub service: Option<String>,
    pub task_role: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Var {
    TrustDomain,
    Cluster,
    Family,
    Service,
    TaskRole,
}

impl Var {
    const ALL: [Var; 5] = [
        Var::TrustDomain,
        Var::Cluster,
        Var::Family,
        Var::Service,
        Var::TaskRole,
    ];

    fn name(self) -> &'static str {
        match self {
            Var::TrustDomain => "trust_domain",
            Var::Cluster => "cluster",
            Var::Family => "family",
            Var::Service => "service",
            Var::TaskRole => "task_role",
        }
    }

    fn value(self, vars: &TemplateVars) -> Option<&str> {
        let v = match self {
            Var::TrustDomain => Some(vars.trust_domain.as_str()),
            Var::Cluster => Some(vars.cluster.as_str()),
            Var::Family => Some(vars.family.as_str()),
            Var::Service => vars.service.as_deref(),
            Var::TaskRole => vars.task_role.as_deref(),
        };
        v.filter(|s| !s.is_empty())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Var(Var),
}

/// A SPIFFE ID with `{placeholders}`, validated when it is built so that a config error
/// shows at start-up and not when the first task arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityTemplate {
    source: String,
    pieces: Vec<Piece>,
}

impl serde::Serialize for IdentityTemplate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl IdentityTemplate {
    pub fn new(template: &str) -> Result<Self, IdentityError> {
        let err = |reason: String| IdentityError::InvalidTemplate {
            template: template.to_owned(),
            reason,
        };
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = template;
        while let Some(i) = rest.find(['{', '}']) {
            literal.push_str(&rest[..i]);
            if rest.as_bytes()[i] == b'}' {
                return Err(err("'}' without '{'".into()));
            }
            let after = &rest[i + 1..];
            let end = after
                .find('}')
                .ok_or_else(|| err("'{' without '}'".into()))?;
            let name = &after[..end];
            let var = Var::ALL
                .into_iter()
                .find(|v| v.name() == name)
                .ok_or_else(|| {
                    err(format!(
                        "unknown placeholder {{{name}}}; known: {{trust_domain}} {{cluster}} \
                         {{family}} {{service}} {{task_role}}"
                    ))
                })?;
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            pieces.push(Piece::Var(var));
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        let tpl = Self {
            source: template.to_owned(),
            pieces,
        };
        // Render with well-formed sample values: whatever fails now is the template's fault.
        let sample = TemplateVars {
            trust_domain: TrustDomain::new("example.org")?,
            cluster: "cluster".into(),
            family: "family".into(),
            service: Some("service".into()),
            task_role: Some("role".into()),
        };
        tpl.render(&sample).map_err(|e| err(e.to_string()))?;
        Ok(tpl)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Substitutes the placeholders. Values must be single path segments: a `/` in a family
    /// name must not be able to forge a deeper (different) identity.
    pub fn render(&self, vars: &TemplateVars) -> Result<SpiffeId, IdentityError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(s) => out.push_str(s),
                Piece::Var(v) => {
                    let value = v
                        .value(vars)
                        .ok_or(IdentityError::MissingTemplateValue { name: v.name() })?;
                    if !is_segment(value) {
                        return Err(IdentityError::InvalidTemplateValue {
                            name: v.name(),
                            value: value.to_owned(),
                        });
                    }
                    out.push_str(value);
                }
            }
        }
        SpiffeId::parse(&out)
    }
}

impl Default for IdentityTemplate {
    fn default() -> Self {
        Self::new(DEFAULT_TEMPLATE).expect("the default template is valid")
    }
}

impl fmt::Display for IdentityTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}
