//! The data path, in ztunnel's layout: `outbound` accepts the connections the kernel
//! redirected and sends them through the mTLS tunnel (`pool`, `dial`) to the destination's
//! node proxy, whose `inbound` side checks each stream or request (`admission`) and hands
//! it to the local task. HTTP is detected on the outbound side (`detect`) and carried
//! request by request (`http`); everything else is an opaque stream. HBONE-style: TLS 1.3
//! with workload certificates on both sides, then HTTP/2 (`CONNECT <endpoint ip:port>`
//! streams or requests), many streams per TLS connection.
mod admission;
pub(crate) mod detect;
mod dial;
mod http;
mod inbound;
mod outbound;
mod pool;
mod prefixed;
mod report;
mod route;
mod tunnel;

use std::sync::Arc;

pub use admission::Admission;
pub use dial::{Dial, PoolKey, TlsDialer};
pub use inbound::Inbound;
pub use outbound::Outbound;
pub use pool::{PoolSettings, Sender, StreamLease, TunnelPool};
pub use tunnel::{HANDSHAKE_TIMEOUT, MAX_HEADER_LIST, TunnelError};

use crate::{
    discovery::{Discovery, Endpoint},
    identity::{IdentityTemplate, SpiffeId, TemplateVars, TrustDomain},
};

/// The identity a meshed endpoint must prove, derived the same way its own node derives it.
pub struct ExpectedIdentity {
    pub template: IdentityTemplate,
    pub trust_domain: TrustDomain,
    pub cluster: String,
}

impl ExpectedIdentity {
    /// A local task's own identity (no service or role known from the ECS agent).
    pub fn for_family(&self, family: &str) -> Option<SpiffeId> {
        self.render_family(family).ok()
    }

    /// [`Self::for_family`], saying why it cannot be rendered (a template naming
    /// `{service}` or `{task_role}`, which a local ECS task's agent record lacks).
    pub fn render_family(&self, family: &str) -> Result<SpiffeId, crate::identity::IdentityError> {
        self.template.render(&self.vars(family, None))
    }

    /// The identity discovery names for the endpoint, else the template rendered from
    /// what discovery knows (family, service); `None` when it cannot be rendered.
    pub fn for_endpoint(&self, ep: &Endpoint) -> Option<SpiffeId> {
        match &ep.identity {
            Some(id) => Some(id.clone()),
            None => self.render(&ep.family, Some(&ep.service)),
        }
    }

    fn render(&self, family: &str, service: Option<&str>) -> Option<SpiffeId> {
        self.template.render(&self.vars(family, service)).ok()
    }

    fn vars(&self, family: &str, service: Option<&str>) -> TemplateVars {
        TemplateVars {
            trust_domain: self.trust_domain.clone(),
            cluster: self.cluster.clone(),
            family: family.to_owned(),
            service: service.map(str::to_owned),
            task_role: None,
        }
    }
}

/// Everything the outbound side needs to send a flow through the mesh.
pub struct Mesh {
    pub discovery: Arc<arc_swap::ArcSwap<Discovery>>,
    pub pool: TunnelPool,
    pub expected: Arc<ExpectedIdentity>,
    /// Per-service balancing state and retry budgets.
    pub balancer: crate::balance::Balancer,
    /// Per-service retries, timeouts and balancing.
    pub traffic: Arc<crate::config::Traffic>,
}

impl Mesh {
    /// `/endpoints`: every service's endpoints as discovery has them (address, family,
    /// subset, weight, tunnel, task) with what the balancer knows of each.
    pub fn endpoints_report(&self) -> serde_json::Value {
        let now = std::time::Instant::now();
        let discovery = self.discovery.load();
        let services: serde_json::Map<String, serde_json::Value> = discovery
            .services()
            .map(|(name, eps)| {
                let state = self.balancer.existing(name);
                let list: Vec<serde_json::Value> = eps
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "address": e.addr.to_string(),
                            "family": e.family,
                            "subset": e.subset,
                            "weight": e.weight,
                            "tunnel": e.tunnel.to_string(),
                            "task": e.task.as_ref().map(|t| t.as_str().to_owned()),
                            "balancer": state.as_ref().and_then(|s| s.state(e.addr)).map(|st| st.report(now)),
                        })
                    })
                    .collect();
                (name.to_owned(), serde_json::Value::Array(list))
            })
            .collect();
        serde_json::json!({ "services": services })
    }
}
