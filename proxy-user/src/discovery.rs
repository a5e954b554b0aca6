//! Which destinations are meshed. Today a static file; the Cloud Map source of the ECS
//! integration fills the same `Discovery` structure, so the routing code never knows
//! where endpoints came from.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{identity::SpiffeId, types::TaskId};

mod sources;
pub use sources::Sources;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// One task endpoint that accepts mesh traffic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub service: String,
    /// Where the task listens (host- and bridge-mode tasks publish on the instance address).
    pub addr: SocketAddr,
    /// Task family: decides the identity the endpoint must present.
    pub family: String,
    /// The weight of the endpoint's subset for traffic shifting (0: no new requests).
    pub weight: u32,
    /// The subset (say, the task definition revision) the endpoint belongs to; a
    /// service's requests are split between its subsets by weight.
    pub subset: Option<String>,
    /// The destination instance's proxy inbound (tunnel) address.
    pub tunnel: SocketAddr,
    /// The ECS task behind the endpoint, when the source knows it (Cloud Map instance ids
    /// of ECS services are task ids): lets the destination gate on that task's health.
    pub task: Option<TaskId>,
    /// The SPIFFE ID the endpoint must present, when discovery says it (an identity the
    /// caller cannot render from the template, say one naming the task's IAM role);
    /// otherwise the caller renders the template from the family and service.
    pub identity: Option<SpiffeId>,
}

#[derive(Debug, Default, Clone)]
pub struct Discovery {
    by_addr: HashMap<SocketAddr, Endpoint>,
    services: BTreeMap<String, Vec<Endpoint>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    services: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    address: SocketAddr,
    family: String,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    subset: Option<String>,
    /// Tunnel address; defaults to the endpoint IP on the inbound port.
    #[serde(default)]
    tunnel: Option<SocketAddr>,
    /// ECS task id behind the endpoint (optional).
    #[serde(default)]
    task: Option<String>,
    /// The SPIFFE ID the endpoint presents (optional; default: rendered from the template).
    #[serde(default)]
    identity: Option<String>,
}

impl Discovery {
    pub fn load(path: &Path, inbound_port: u16) -> Result<Self, DiscoveryError> {
        let text = std::fs::read_to_string(path).map_err(|source| DiscoveryError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &text, inbound_port)
    }

    pub fn parse(path: &Path, text: &str, inbound_port: u16) -> Result<Self, DiscoveryError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| DiscoveryError::Parse {
            path: path.into(),
            message: e.to_string().replace('\n', " "),
        })?;
        let invalid = |field: String, message: String| DiscoveryError::Invalid {
            path: path.into(),
            field,
            message,
        };
        let mut endpoints = Vec::new();
        for (i, svc) in raw.services.into_iter().enumerate() {
            if svc.name.is_empty() {
                return Err(invalid(
                    format!("services[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            for (j, ep) in svc.endpoints.into_iter().enumerate() {
                let field = format!("services[{i}].endpoints[{j}]");
                if ep.family.is_empty() {
                    return Err(invalid(
                        format!("{field}.family"),
                        "must not be empty".into(),
                    ));
                }
                if ep.subset.as_deref() == Some("") {
                    return Err(invalid(
                        format!("{field}.subset"),
                        "must not be empty (leave it out for no subset)".into(),
                    ));
                }
                let task = ep
                    .task
                    .as_deref()
                    .map(TaskId::new)
                    .transpose()
                    .map_err(|e| invalid(format!("{field}.task"), e))?;
                let identity = ep
                    .identity
                    .as_deref()
                    .map(SpiffeId::parse)
                    .transpose()
                    .map_err(|e| invalid(format!("{field}.identity"), e.to_string()))?;
                endpoints.push(Endpoint {
                    task,
                    identity,
                    service: svc.name.clone(),
                    addr: ep.address,
                    family: ep.family,
                    weight: ep.weight.unwrap_or(1),
                    subset: ep.subset,
                    tunnel: ep
                        .tunnel
                        .unwrap_or(SocketAddr::new(ep.address.ip(), inbound_port)),
                });
            }
        }
        Self::from_endpoints(endpoints).map_err(|(addr, a, b)| {
            invalid(
                "services".into(),
                format!("{addr} is listed for both {a} and {b}"),
            )
        })
    }

    /// Build from any source; an address claimed by two families is ambiguous.
    pub fn from_endpoints(endpoints: Vec<Endpoint>) -> Result<Self, (SocketAddr, String, String)> {
        let mut d = Discovery::default();
        for ep in endpoints {
            if let Some(prev) = d.by_addr.get(&ep.addr)
                && prev.family != ep.family
            {
                return Err((ep.addr, prev.family.clone(), ep.family));
            }
            d.by_addr.insert(ep.addr, ep.clone());
            d.services.entry(ep.service.clone()).or_default().push(ep);
        }
        Ok(d)
    }

    /// The meshed endpoint at `addr`, if any (v4-mapped addresses are normalised by caller).
    pub fn endpoint(&self, addr: SocketAddr) -> Option<&Endpoint> {
        self.by_addr.get(&addr)
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.by_addr.values()
    }

    /// Every service and its endpoints, by name.
    pub fn services(&self) -> impl Iterator<Item = (&str, &[Endpoint])> {
        self.services
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    pub fn service(&self, name: &str) -> &[Endpoint] {
        self.services.get(name).map_or(&[], Vec::as_slice)
    }

    /// The service a request's authority names: `orders`, `orders:8080`,
    /// `orders.mesh.local` (Cloud Map's `service.namespace`), with or without a port.
    pub fn service_for_authority(&self, authority: &str) -> Option<&str> {
        let host = match authority.strip_prefix('[') {
            // An IPv6 literal names no service.
            Some(_) => return None,
            None => match authority.rsplit_once(':') {
                Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                    h
                }
                _ => authority,
            },
        };
        let first = host.split('.').next().unwrap_or(host);
        self.services
            .keys()
            .find(|name| name.as_str() == host || name.as_str() == first)
            .map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_authority_names_a_service_by_short_or_cloud_map_name() {
        let d = Discovery::parse(
            Path::new("d.toml"),
            "[[services]]\nname = \"orders\"\n[[services.endpoints]]\naddress = \"10.0.0.2:80\"\nfamily = \"orders\"\n",
            15008,
        )
        .unwrap();
        for a in [
            "orders",
            "orders:80",
            "orders.mesh.local",
            "orders.mesh.local:8080",
        ] {
            assert_eq!(d.service_for_authority(a), Some("orders"), "{a}");
        }
        for a in [
            "billing",
            "10.0.0.2:80",
            "[fd00::2]:80",
            "ordersx.mesh.local",
        ] {
            assert_eq!(d.service_for_authority(a), None, "{a}");
        }
    }

    const FILE: &str = r#"
[[services]]
name = "orders"
[[services.endpoints]]
address = "10.0.0.2:8080"
family = "orders"
[[services.endpoints]]
address = "10.0.0.3:8080"
family = "orders"
weight = 3
tunnel = "10.0.1.3:15008"
"#;

    #[test]
    fn endpoints_default_their_tunnel_to_the_endpoint_ip() {
        let d = Discovery::parse(Path::new("d.toml"), FILE, 15008).unwrap();
        let ep = d.endpoint("10.0.0.2:8080".parse().unwrap()).unwrap();
        assert_eq!(ep.tunnel, "10.0.0.2:15008".parse().unwrap());
        assert_eq!(ep.weight, 1);
        let ep = d.endpoint("10.0.0.3:8080".parse().unwrap()).unwrap();
        assert_eq!(
            (ep.tunnel, ep.weight),
            ("10.0.1.3:15008".parse().unwrap(), 3)
        );
        assert_eq!(d.service("orders").len(), 2);
        assert!(d.endpoint("10.0.0.9:8080".parse().unwrap()).is_none());
    }

    #[test]
    fn an_endpoint_may_name_its_identity() {
        let text = FILE.replace(
            "weight = 3",
            "identity = \"spiffe://example.org/role/orders-role\"",
        );
        let d = Discovery::parse(Path::new("d.toml"), &text, 15008).unwrap();
        let named = d.endpoint("10.0.0.3:8080".parse().unwrap()).unwrap();
        assert_eq!(
            named.identity.as_ref().unwrap().to_string(),
            "spiffe://example.org/role/orders-role"
        );
        assert!(
            d.endpoint("10.0.0.2:8080".parse().unwrap())
                .unwrap()
                .identity
                .is_none()
        );
        let bad = FILE.replace("weight = 3", "identity = \"orders-role\"");
        let e = Discovery::parse(Path::new("d.toml"), &bad, 15008).unwrap_err();
        assert!(
            e.to_string().contains("services[0].endpoints[1].identity"),
            "{e}"
        );
    }

    #[test]
    fn bad_files_name_the_field() {
        let e = Discovery::parse(
            Path::new("d.toml"),
            &FILE.replace("weight = 3", "subset = \"\""),
            15008,
        );
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("services[0].endpoints[1].subset")
        );
        // Weight 0 is valid: that endpoint's subset gets no new requests.
        let d = Discovery::parse(
            Path::new("d.toml"),
            &FILE.replace("weight = 3", "weight = 0\nsubset = \"v2\""),
            15008,
        )
        .unwrap();
        let ep = d.endpoint("10.0.0.3:8080".parse().unwrap()).unwrap();
        assert_eq!((ep.weight, ep.subset.as_deref()), (0, Some("v2")));
        let e = Discovery::parse(
            Path::new("d.toml"),
            "[[services]]\nname = \"x\"\nbogus = 1\n",
            15008,
        );
        assert!(e.unwrap_err().to_string().contains("bogus"));
        let dup = format!(
            "{FILE}\n[[services]]\nname = \"other\"\n[[services.endpoints]]\naddress = \"10.0.0.2:8080\"\nfamily = \"web\"\n"
        );
        assert!(Discovery::parse(Path::new("d.toml"), &dup, 15008).is_err());
    }
}
