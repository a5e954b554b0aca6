//! The mTLS side of the proxy, present when the config has an `[identity]` section.
use std::sync::Arc;

use tokio::net::TcpListener;

use super::{RunError, bind};
use crate::{
    config::{Config, IdentitySource},
    discovery::Sources,
    identity::{IdentityConfig, IdentityManager, manager::SvidSource, remote::RemoteConfig},
    metrics::{IssuerCallLabels, Metrics},
    proxy::{Admission, ExpectedIdentity, Inbound, Mesh, PoolSettings, TlsDialer, TunnelPool},
    tasks::TaskTable,
};

pub(super) struct MeshParts {
    pub identities: Arc<IdentityManager>,
    pub sources: Arc<Sources>,
    pub mesh: Arc<Mesh>,
    pub inbound: Arc<Inbound>,
    pub listeners: Vec<TcpListener>,
}

/// Load the identity material, issue every local task its certificate, bind the tunnel
/// listener: all before anything is attached, so a bad CA directory fails the start.
pub(super) fn parts(
    config: &Config,
    metrics: &Arc<Metrics>,
    tasks: &Arc<TaskTable>,
) -> Result<Option<MeshParts>, RunError> {
    let Some(idn) = &config.identity else {
        return Ok(None);
    };
    let source = match &idn.source {
        IdentitySource::IssuerDir(dir) => SvidSource::IssuerDir(dir.clone()),
        IdentitySource::Issuer { url, attestation } => SvidSource::Issuer(RemoteConfig {
            issuer_url: url.clone(),
            attestation: attestation.clone(),
            trust_domain: idn.trust_domain.clone(),
            state_dir: config.state_dir.join("identity"),
        }),
    };
    let identities = IdentityManager::new(IdentityConfig {
        bundle: idn.bundle.clone(),
        source,
        svid_lifetime: idn.svid_lifetime,
        allowed_trust_domains: idn.allowed_trust_domains.clone(),
    })?;
    let trust_metrics = metrics.clone();
    identities.observe_trust(move |status| trust_metrics.set_trust(status));
    if let Some(remote) = identities.remote() {
        let calls = metrics.issuer_calls.clone();
        remote.observe(Box::new(move |call, result| {
            calls
                .get_or_create(&IssuerCallLabels {
                    call: call.as_str(),
                    result: result.to_owned(),
                })
                .inc();
        }));
    }
    for (_, task) in tasks.all() {
        let Some(id) = &task.identity else { continue };
        if identities.remote().is_some() {
            // The issuer names ECS tasks by ARN; a task listed in the config has none.
            tracing::warn!(task = %task.id, identity = %id, "issuer mode: a task listed in the config gets no certificate (the issuer issues for ECS tasks only); its meshed connections fail (no_identity)");
            continue;
        }
        let svid = identities.ensure(id)?;
        tracing::info!(task = %task.id, identity = %id, serial = %svid.serial, "certificate issued");
    }
    let sources = Sources::new(
        &config.discovery,
        config.discovery_file.clone(),
        config.inbound_port(),
    );
    let discovery = sources.view();
    let mut listeners = Vec::new();
    for (addr, required) in config.inbound_listen_addrs() {
        match bind("inbound_addr", addr) {
            Ok(l) => listeners.push(l),
            Err(e) if !required => {
                tracing::warn!(error = %e, "tunnel not served on IPv6: peers must reach this instance over IPv4")
            }
            Err(e) => return Err(e),
        }
    }
    let mesh = Arc::new(Mesh {
        discovery: discovery.clone(),
        pool: TunnelPool::new(
            TlsDialer {
                identities: identities.clone(),
                metrics: metrics.clone(),
                socket_mark: config.socket_mark,
            },
            metrics.clone(),
            PoolSettings::new(config.tunnel_stream_cap, &config.limits),
        ),
        expected: Arc::new(ExpectedIdentity {
            template: idn.template.clone(),
            trust_domain: idn.trust_domain.clone(),
            cluster: config.cluster.clone(),
        }),
        balancer: Default::default(),
        traffic: Arc::new(config.traffic.clone()),
    });
    let inbound = Arc::new(Inbound {
        identities: identities.clone(),
        admission: Admission {
            tasks: tasks.clone(),
            discovery,
            policy: config.authorization.clone(),
            metrics: metrics.clone(),
        },
        metrics: metrics.clone(),
        socket_mark: config.socket_mark,
        stream_cap: config.tunnel_stream_cap,
        apps: Default::default(),
        limits: config.limits.clone(),
        handshake_slots: Arc::new(tokio::sync::Semaphore::new(
            config.limits.tunnel_handshake_cap,
        )),
        cluster: config.cluster.clone(),
    });
    Ok(Some(MeshParts {
        identities,
        sources,
        mesh,
        inbound,
        listeners,
    }))
}
