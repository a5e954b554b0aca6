//! The destination's verdict on a tunnelled stream or request, apart from sockets and TLS
//! so it has unit tests: the target must be an endpoint of a task enrolled on this instance
//! (never an open relay), of exactly the family whose identity the caller verified, allowed
//! by the policy, and behind an open health gate.
use std::{net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use hyper::StatusCode;
use tokio_util::sync::CancellationToken;

use crate::{
    authz::Policy,
    discovery::{Discovery, Endpoint},
    identity::SpiffeId,
    metrics::Metrics,
    tasks::TaskTable,
    types::normalise,
};

pub struct Admission {
    /// Tasks enrolled here: which identities this instance may present, and whether the
    /// task behind an endpoint takes new connections.
    pub tasks: Arc<TaskTable>,
    pub discovery: Arc<ArcSwap<Discovery>>,
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
}

/// A refusal: the status and the `ecsmesh-proxy-error` reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Denied(pub StatusCode, pub &'static str);

/// An endpoint that passed every check, and the drain token of its task.
#[derive(Debug)]
pub struct Admitted {
    pub ep: Endpoint,
    pub drain: CancellationToken,
}

impl Admission {
    fn deny(&self, reason: &'static str, source: &SpiffeId, target: &str, family: &str) -> Denied {
        self.metrics.reject("server", reason);
        tracing::warn!(source_identity = %source, destination_family = family, %target, reason, "tunnel stream denied");
        Denied(StatusCode::FORBIDDEN, reason)
    }

    /// `family` is the family of the identity this TLS connection presented; `local` the
    /// address the caller reached (this instance's tunnel address).
    pub fn admit(
        &self,
        target: SocketAddr,
        source: &SpiffeId,
        family: &str,
        local: SocketAddr,
    ) -> Result<Admitted, Denied> {
        let shown = target.to_string();
        let target = normalise(target);
        let local_ip = normalise(local).ip();
        let discovery = self.discovery.load();
        let Some(ep) = discovery
            .endpoint(target)
            .filter(|ep| normalise(ep.tunnel).ip() == local_ip)
        else {
            return Err(self.deny("not_local_endpoint", source, &shown, family));
        };
        if ep.family != family {
            return Err(self.deny("identity_mismatch", source, &shown, &ep.family));
        }
        if !self.policy.allows(source, &ep.family, target.port()) {
            return Err(self.deny("authorization_denied", source, &shown, &ep.family));
        }
        // Health gate: a task that is starting, unhealthy or stopping takes no new streams.
        if !self.tasks.serving(&ep.family, ep.task.as_ref()) {
            self.metrics.reject("server", "not_serving");
            tracing::info!(source_identity = %source, %target, family = %ep.family, "endpoint not serving (health gate)");
            return Err(Denied(StatusCode::SERVICE_UNAVAILABLE, "not_serving"));
        }
        let drain = ep
            .task
            .as_ref()
            .and_then(|id| self.tasks.find(id))
            .map(|(_, t)| t.drain.clone())
            .unwrap_or_default();
        Ok(Admitted {
            ep: ep.clone(),
            drain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{authz::AllowRule, tasks::TaskRef, types::TaskId};

    const LOCAL: &str = "10.0.0.2:15008";
    const WEB: &str = "10.0.0.2:8080";
    const REMOTE: &str = "10.0.0.3:8080";

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn endpoint(addr: &str, family: &str, tunnel: &str, task: &str) -> Endpoint {
        Endpoint {
            service: family.into(),
            addr: addr.parse().unwrap(),
            family: family.into(),
            weight: 1,
            subset: None,
            tunnel: tunnel.parse().unwrap(),
            task: Some(TaskId::new(task).unwrap()),
            identity: None,
        }
    }

    fn admission(allow: Vec<AllowRule>) -> Admission {
        let tasks = Arc::new(TaskTable::default());
        tasks.insert(TaskRef::new(
            TaskId::new("t-web").unwrap(),
            "web".into(),
            Some(id("spiffe://td/ecs/test/web")),
            true,
        ));
        let discovery = Discovery::from_endpoints(vec![
            endpoint(WEB, "web", LOCAL, "t-web"),
            endpoint(REMOTE, "web", "10.0.0.3:15008", "t-other"),
        ])
        .unwrap();
        Admission {
            tasks,
            discovery: Arc::new(ArcSwap::from_pointee(discovery)),
            policy: Policy { allow },
            metrics: Arc::new(Metrics::default()),
        }
    }

    fn verdict(a: &Admission, target: &str, family: &str) -> Result<Endpoint, Denied> {
        a.admit(
            target.parse().unwrap(),
            &id("spiffe://td/ecs/test/client"),
            family,
            LOCAL.parse().unwrap(),
        )
        .map(|ok| ok.ep)
    }

    #[test]
    fn a_local_endpoint_of_the_presented_family_is_admitted() {
        let a = admission(Vec::new());
        assert_eq!(verdict(&a, WEB, "web").unwrap().addr, WEB.parse().unwrap());
        // v4-mapped IPv6 is the same endpoint.
        assert!(verdict(&a, "[::ffff:10.0.0.2]:8080", "web").is_ok());
    }

    #[test]
    fn never_an_open_relay() {
        let a = admission(Vec::new());
        let refused = Denied(StatusCode::FORBIDDEN, "not_local_endpoint");
        // Another instance's endpoint, an unknown address, the host's own loopback.
        assert_eq!(verdict(&a, REMOTE, "web").unwrap_err(), refused);
        assert_eq!(verdict(&a, "10.0.0.2:22", "web").unwrap_err(), refused);
        assert_eq!(verdict(&a, "127.0.0.1:15000", "web").unwrap_err(), refused);
    }

    #[test]
    fn a_caller_verified_as_one_family_cannot_reach_another() {
        let a = admission(Vec::new());
        assert_eq!(
            verdict(&a, WEB, "api").unwrap_err(),
            Denied(StatusCode::FORBIDDEN, "identity_mismatch")
        );
    }

    #[test]
    fn the_policy_decides_by_source_family_and_port() {
        let rule = |source: &str, port| AllowRule {
            source: source.into(),
            destination_family: Some("web".into()),
            port,
        };
        let a = admission(vec![rule("spiffe://td/ecs/test/other", None)]);
        assert_eq!(
            verdict(&a, WEB, "web").unwrap_err(),
            Denied(StatusCode::FORBIDDEN, "authorization_denied")
        );
        let a = admission(vec![rule("spiffe://td/ecs/test/*", Some(9999))]);
        assert!(verdict(&a, WEB, "web").is_err(), "wrong port");
        let a = admission(vec![rule("spiffe://td/ecs/test/*", Some(8080))]);
        assert!(verdict(&a, WEB, "web").is_ok());
    }

    #[test]
    fn a_closed_health_gate_is_503_and_a_draining_task_hands_out_its_token() {
        let a = admission(Vec::new());
        let (_, task) = a.tasks.find(&TaskId::new("t-web").unwrap()).unwrap();
        let admitted = a
            .admit(
                WEB.parse().unwrap(),
                &id("spiffe://td/ecs/test/client"),
                "web",
                LOCAL.parse().unwrap(),
            )
            .unwrap();
        assert!(!admitted.drain.is_cancelled());
        task.drain.cancel();
        assert!(admitted.drain.is_cancelled(), "the task's own drain token");
        task.set_serving(false);
        assert_eq!(
            verdict(&a, WEB, "web").unwrap_err(),
            Denied(StatusCode::SERVICE_UNAVAILABLE, "not_serving")
        );
        let text = a.metrics.encode();
        assert!(
            text.contains("reason=\"not_serving\""),
            "refusals are counted: {text}"
        );
    }
}
