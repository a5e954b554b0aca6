//! Service discovery from AWS Cloud Map (`DiscoverInstances`), the source that ECS service
//! discovery fills: every task of a service with service registries is an instance with
//! the attributes `AWS_INSTANCE_IPV4`, `AWS_INSTANCE_PORT` and `ECS_TASK_DEFINITION_FAMILY`.
//!
//! Produces the same [`Endpoint`]s as the static discovery file, so the routing layer never
//! knows where endpoints came from. Design choices, and why:
//! - **All or nothing per refresh**: a refresh that fails for one service fails as a whole
//!   and the caller keeps the last good set. Half a refresh would silently drop a whole
//!   service's endpoints during an API brown-out, which is worse than serving a slightly
//!   stale set. The only per-service answer taken as data is `ServiceNotFound`: a deleted
//!   (or misspelt) service has no endpoints, and it must not pin the other services' sets.
//! - **`HealthStatus = ALL`, unhealthy excluded here**: Cloud Map reports instances without
//!   health checks as `UNKNOWN`; those take traffic (ECS already gates on container health
//!   before it registers a task), `UNHEALTHY` ones do not. Filtering client-side also lets
//!   the metrics say how many instances were excluded and why.
//! - **No `data-` host prefix with an endpoint override**: the SDK sends `DiscoverInstances`
//!   to `data-<endpoint host>` (the data-plane endpoint). Against moto on
//!   `http://127.0.0.1:PORT` that becomes `data-127.0.0.1`, which does not resolve. This SDK
//!   version has no `disable_host_prefix` setting (other SDKs' `inject_host_prefix` /
//!   `disableHostPrefixInjection`), so `NoHostPrefix`, a client interceptor, removes the
//!   operation's `EndpointPrefix` from the request's config bag before the endpoint is
//!   applied — only on clients whose config has an endpoint override.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::Duration,
};

use aws_sdk_servicediscovery::{
    Client,
    config::{
        ConfigBag, Intercept, RuntimeComponents, interceptors::BeforeTransmitInterceptorContextRef,
    },
    error::DisplayErrorContext,
    operation::discover_instances::DiscoverInstancesError,
    types::{HealthStatus, HealthStatusFilter, HttpInstanceSummary},
};
use aws_smithy_runtime_api::{box_error::BoxError, client::endpoint::EndpointPrefix};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{discovery::Endpoint, types::TaskId};

mod metrics;
pub use metrics::{CloudMapMetrics, ReasonLabels, ResultLabels};

/// Instance attribute ECS sets to the task's IPv4 address (host/bridge: the instance's).
pub const ATTR_IPV4: &str = "AWS_INSTANCE_IPV4";
/// Set instead of the IPv4 attribute for IPv6-only registrations.
pub const ATTR_IPV6: &str = "AWS_INSTANCE_IPV6";
/// The port the task publishes (host port in bridge mode).
pub const ATTR_PORT: &str = "AWS_INSTANCE_PORT";
/// The task family: decides the workload identity the endpoint must present.
pub const ATTR_FAMILY: &str = "ECS_TASK_DEFINITION_FAMILY";
/// Optional custom attribute for weighted traffic shifting: the weight of the instance's
/// subset (0: no new requests); default 1.
pub const ATTR_WEIGHT: &str = "ecsmesh.weight";
/// Optional custom attribute: the subset the instance belongs to (say, the task
/// definition revision) for traffic shifting.
pub const ATTR_SUBSET: &str = "ecsmesh.subset";
/// Optional custom attribute: the SPIFFE ID the instance presents, when callers cannot
/// render it from the template (an identity naming the task's IAM role, say).
pub const ATTR_IDENTITY: &str = "ecsmesh.identity";

/// The most instances one `DiscoverInstances` call returns (the API's maximum; the call
/// has no pagination, the default would be 100).
const MAX_RESULTS: i32 = 1000;
/// Distinct warnings remembered so a bad instance is reported once, not every refresh.
const WARNED_CAP: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum CloudMapError {
    #[error("cloud map: {field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("cloud map: {0}")]
    Aws(#[from] crate::aws::AwsError),
    /// The SDK error's full chain (`DisplayErrorContext`), e.g. "dispatch failure: io error:
    /// Connection refused", rather than the top-level "dispatch failure".
    #[error("cloud map: DiscoverInstances {namespace}/{service}: {message}")]
    Discover {
        namespace: String,
        service: String,
        message: String,
    },
    #[error("cloud map: refresh task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What to discover and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudMapConfig {
    /// Cloud Map namespace name (HTTP or private DNS namespace), e.g. `mesh.local`.
    pub namespace: String,
    /// Cloud Map service names; each becomes a service of the same name in discovery.
    pub services: Vec<String>,
    /// Time between refreshes.
    pub refresh: Duration,
    /// Endpoint override (moto in tests); see [`crate::aws::sdk_config`].
    pub endpoint: Option<String>,
    /// `None`: the default region chain.
    pub region: Option<String>,
}

/// One successful refresh: the endpoints and what was left out.
#[derive(Debug, Default)]
struct Snapshot {
    endpoints: Vec<Endpoint>,
    unhealthy: usize,
    invalid: usize,
}

/// Endpoints of a fixed list of Cloud Map services in one namespace.
#[derive(Debug)]
pub struct CloudMapSource {
    config: CloudMapConfig,
    client: Client,
    /// Warnings already logged (bounded), so a malformed instance is reported once.
    warned: Mutex<HashSet<String>>,
}

impl CloudMapSource {
    /// Build the SDK client from `config` (endpoint override, region; see
    /// [`crate::aws::sdk_config`]). Makes no AWS call.
    pub async fn new(config: CloudMapConfig) -> Result<Self, CloudMapError> {
        check_config(&config)?;
        let sdk =
            crate::aws::sdk_config(config.endpoint.as_deref(), config.region.as_deref()).await?;
        let mut builder = aws_sdk_servicediscovery::config::Builder::from(&sdk);
        if sdk.endpoint_url().is_some() {
            builder = builder.interceptor(NoHostPrefix);
        }
        Ok(Self {
            client: Client::from_conf(builder.build()),
            config,
            warned: Mutex::new(HashSet::new()),
        })
    }

    pub fn config(&self) -> &CloudMapConfig {
        &self.config
    }

    /// One `DiscoverInstances` per service (concurrently), mapped to endpoints sorted by
    /// (service, address); tunnels are the endpoint IP on `inbound_port`. Fails as a whole
    /// when any service's call fails, except `ServiceNotFound` (no endpoints, warned).
    pub async fn refresh(&self, inbound_port: u16) -> Result<Vec<Endpoint>, CloudMapError> {
        Ok(self.snapshot(inbound_port).await?.endpoints)
    }

    async fn snapshot(&self, inbound_port: u16) -> Result<Snapshot, CloudMapError> {
        let mut calls = JoinSet::new();
        for service in &self.config.services {
            let request = self
                .client
                .discover_instances()
                .namespace_name(&self.config.namespace)
                .service_name(service)
                .health_status(HealthStatusFilter::All)
                .max_results(MAX_RESULTS);
            let service = service.clone();
            calls.spawn(async move { (service, request.send().await) });
        }
        let mut snapshot = Snapshot::default();
        // Dropping `calls` on an early return aborts the remaining calls.
        while let Some(joined) = calls.join_next().await {
            let (service, result) = joined?;
            let output = match result {
                Ok(output) => output,
                Err(e)
                    if matches!(
                        e.as_service_error(),
                        Some(DiscoverInstancesError::ServiceNotFound(_))
                    ) =>
                {
                    self.warn_once(format!(
                        "Cloud Map service {}/{service} does not exist: no endpoints",
                        self.config.namespace
                    ));
                    continue;
                }
                Err(e) => {
                    return Err(CloudMapError::Discover {
                        namespace: self.config.namespace.clone(),
                        service,
                        message: DisplayErrorContext(e).to_string(),
                    });
                }
            };
            for instance in output.instances() {
                match endpoint_of(&service, instance, inbound_port) {
                    Ok(Mapped {
                        endpoint,
                        defaulted,
                    }) => {
                        for note in defaulted {
                            self.warn_once(note);
                        }
                        snapshot.endpoints.push(endpoint);
                    }
                    Err(Excluded::Unhealthy) => snapshot.unhealthy += 1,
                    Err(Excluded::Invalid(why)) => {
                        snapshot.invalid += 1;
                        self.warn_once(why);
                    }
                }
            }
        }
        snapshot
            .endpoints
            .sort_by(|a, b| (&a.service, a.addr).cmp(&(&b.service, b.addr)));
        Ok(snapshot)
    }

    /// Refresh every `config.refresh` until `shutdown`, calling `on_update` with the new
    /// endpoint set after the first successful refresh and whenever the set changes.
    ///
    /// A failed refresh does not call `on_update`: the caller keeps serving the last good
    /// set (or none yet), and the failure shows in `ecsmesh_cloudmap_refresh_total
    /// {result="error"}` and a stale `..._last_success_timestamp_seconds`. The first
    /// `on_update` call is the "discovery synced" signal for readiness.
    pub fn spawn<F>(
        self,
        inbound_port: u16,
        on_update: F,
        shutdown: CancellationToken,
        metrics: CloudMapMetrics,
    ) -> JoinHandle<()>
    where
        F: Fn(Vec<Endpoint>) + Send + 'static,
    {
        tokio::spawn(async move {
            let mut last_good: Option<Vec<Endpoint>> = None;
            let mut failures: u64 = 0;
            let mut ticks = tokio::time::interval(self.config.refresh);
            // After a slow (retrying) refresh, wait a full interval instead of bursting.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let result = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    result = self.snapshot(inbound_port) => result,
                };
                match result {
                    Ok(snapshot) => {
                        metrics.record_ok(&snapshot);
                        if failures > 0 {
                            tracing::info!(failures, "Cloud Map refresh recovered");
                            failures = 0;
                        }
                        if last_good.as_ref() != Some(&snapshot.endpoints) {
                            tracing::info!(
                                namespace = %self.config.namespace,
                                endpoints = snapshot.endpoints.len(),
                                unhealthy = snapshot.unhealthy,
                                invalid = snapshot.invalid,
                                "Cloud Map endpoint set changed"
                            );
                            on_update(snapshot.endpoints.clone());
                            last_good = Some(snapshot.endpoints);
                        }
                    }
                    Err(e) => {
                        metrics.record_error();
                        failures += 1;
                        // An outage fails every interval: warn at its start and then
                        // every tenth time; the metrics carry the rest.
                        if failures % 10 == 1 {
                            tracing::warn!(
                                error = %e,
                                failures,
                                kept = last_good.as_ref().map(Vec::len),
                                "Cloud Map refresh failed; keeping the last good endpoint set"
                            );
                        } else {
                            tracing::debug!(error = %e, failures, "Cloud Map refresh failed");
                        }
                    }
                }
            }
            tracing::debug!(namespace = %self.config.namespace, "Cloud Map refresh stopped");
        })
    }

    fn warn_once(&self, message: String) {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.len() >= WARNED_CAP {
            warned.clear();
        }
        if warned.insert(message.clone()) {
            tracing::warn!("{message}");
        } else {
            tracing::debug!("{message}");
        }
    }
}

fn check_config(config: &CloudMapConfig) -> Result<(), CloudMapError> {
    let invalid = |field, message: &str| {
        Err(CloudMapError::Config {
            field,
            message: message.to_owned(),
        })
    };
    if config.namespace.is_empty() {
        return invalid("namespace", "must not be empty");
    }
    if config.services.is_empty() {
        return invalid("services", "must list at least one service");
    }
    if config.services.iter().any(String::is_empty) {
        return invalid("services", "names must not be empty");
    }
    if config.refresh.is_zero() {
        return invalid("refresh", "must be greater than zero");
    }
    Ok(())
}

struct Mapped {
    endpoint: Endpoint,
    /// Warnings for attributes that fell back to a default.
    defaulted: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Excluded {
    Unhealthy,
    /// Why: no usable address or port.
    Invalid(String),
}

/// Map one instance to an endpoint, or say why it is left out.
fn endpoint_of(
    service: &str,
    instance: &HttpInstanceSummary,
    inbound_port: u16,
) -> Result<Mapped, Excluded> {
    if instance.health_status() == Some(&HealthStatus::Unhealthy) {
        return Err(Excluded::Unhealthy);
    }
    let id = instance.instance_id().unwrap_or("?");
    let attr = |name: &str| {
        instance
            .attributes()
            .and_then(|a| a.get(name))
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    let invalid = |what: String| {
        Excluded::Invalid(format!(
            "Cloud Map instance {service}/{id}: {what}; skipped"
        ))
    };

    let ip: IpAddr = match (attr(ATTR_IPV4), attr(ATTR_IPV6)) {
        (Some(v4), _) => v4
            .parse::<std::net::Ipv4Addr>()
            .map_err(|_| invalid(format!("{ATTR_IPV4} {v4:?} is not an IPv4 address")))?
            .into(),
        (None, Some(v6)) => v6
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| invalid(format!("{ATTR_IPV6} {v6:?} is not an IPv6 address")))?
            .into(),
        (None, None) => return Err(invalid(format!("neither {ATTR_IPV4} nor {ATTR_IPV6}"))),
    };
    let port = match attr(ATTR_PORT) {
        None => return Err(invalid(format!("no {ATTR_PORT}"))),
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid(format!("{ATTR_PORT} {p:?} is not a port")))?,
    };

    // Who the endpoint must prove to be is not a thing to guess: a bad value excludes it.
    let identity = attr(ATTR_IDENTITY)
        .map(|v| {
            crate::identity::SpiffeId::parse(v)
                .map_err(|e| invalid(format!("{ATTR_IDENTITY} {v:?}: {e}")))
        })
        .transpose()?;
    let mut defaulted = Vec::new();
    // ECS registers each task under its task id; other registrations name no task.
    let task = attr(ATTR_FAMILY).and_then(|_| TaskId::new(id).ok());
    let family = match attr(ATTR_FAMILY) {
        Some(f) => f.to_owned(),
        None => {
            defaulted.push(format!(
                "Cloud Map instance {service}/{id}: no {ATTR_FAMILY}; using the service name as its family"
            ));
            service.to_owned()
        }
    };
    let weight = match attr(ATTR_WEIGHT) {
        None => 1,
        Some(w) => match w.parse::<u32>() {
            Ok(w) => w,
            _ => {
                defaulted.push(format!(
                    "Cloud Map instance {service}/{id}: {ATTR_WEIGHT} {w:?} is not a whole number; using 1"
                ));
                1
            }
        },
    };
    Ok(Mapped {
        endpoint: Endpoint {
            service: service.to_owned(),
            addr: SocketAddr::new(ip, port),
            family,
            weight,
            subset: attr(ATTR_SUBSET)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            tunnel: SocketAddr::new(ip, inbound_port),
            task,
            identity,
        },
        defaulted,
    })
}

/// Removes the operation's endpoint host prefix (`data-` for `DiscoverInstances`) before
/// the endpoint is applied. Installed only on clients with an endpoint override: there the
/// prefixed host (`data-127.0.0.1`) does not exist.
///
/// Runs in `read_before_attempt`, which the orchestrator calls after the operation's own
/// interceptor stored the prefix (`read_before_execution`) and before it resolves and
/// applies the endpoint, on every attempt.
#[derive(Debug)]
struct NoHostPrefix;

impl Intercept for NoHostPrefix {
    fn name(&self) -> &'static str {
        "ecsmesh::NoHostPrefix"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state().unset::<EndpointPrefix>();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
