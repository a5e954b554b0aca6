//! The AWS side of a node proxy: Cloud Map endpoints merged into discovery, and the
//! `ecsmesh.ready` container-instance attribute that placement constraints use.
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    aws,
    cloudmap::{CloudMapConfig, CloudMapMetrics, CloudMapSource},
    config::{CloudMapSettings, EcsSettings},
    discovery::Sources,
    ecs::EcsAgent,
};

/// Start the Cloud Map loop. Every update replaces the Cloud Map part of `sources`, keeping
/// the discovery file's endpoints; the returned receiver turns `true` after the first
/// successful refresh (readiness: "discovery synced once"). A set that cannot be merged
/// (one address claimed by two families) is refused and the previous set kept.
pub(super) async fn start_cloudmap(
    settings: &CloudMapSettings,
    sources: Arc<Sources>,
    inbound_port: u16,
    metrics: CloudMapMetrics,
    shutdown: CancellationToken,
) -> Result<watch::Receiver<bool>, crate::cloudmap::CloudMapError> {
    let source = CloudMapSource::new(CloudMapConfig {
        namespace: settings.namespace.clone(),
        services: settings.services.clone(),
        refresh: settings.refresh,
        endpoint: settings.endpoint.clone(),
        region: settings.region.clone(),
    })
    .await?;
    let (synced_tx, synced_rx) = watch::channel(false);
    let on_update = move |endpoints: Vec<crate::discovery::Endpoint>| {
        let n = endpoints.len();
        match sources.set_cloudmap(endpoints) {
            Ok(_) => {
                tracing::info!(cloudmap_endpoints = n, "discovery updated from Cloud Map");
                let _ = synced_tx.send(true);
            }
            Err(e) => tracing::warn!(
                error = %e,
                "Cloud Map endpoints do not merge; keeping the previous endpoints"
            ),
        }
    };
    source.spawn(inbound_port, on_update, shutdown, metrics);
    Ok(synced_rx)
}

/// Publishes `ecsmesh.ready` for this container instance (cluster and instance from the
/// ECS agent), and withdraws it on shutdown.
pub(super) struct ReadyAttribute {
    client: aws_sdk_ecs::Client,
    cluster: String,
    instance: String,
}

impl ReadyAttribute {
    pub async fn publish(settings: &EcsSettings) -> Result<Self, String> {
        let agent = EcsAgent::new(settings.agent_url.clone()).map_err(|e| e.to_string())?;
        let meta = agent.metadata().await.map_err(|e| e.to_string())?;
        let instance = meta
            .container_instance_arn
            .clone()
            .ok_or("the ECS agent has not registered the container instance yet")?;
        let config = aws::sdk_config(settings.aws_endpoint.as_deref(), settings.region.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        let this = Self {
            client: aws_sdk_ecs::Client::new(&config),
            cluster: meta.cluster.clone(),
            instance,
        };
        aws::put_ready_attribute(&this.client, &this.cluster, &this.instance, true)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(cluster = %this.cluster, instance = %this.instance, "published ecsmesh.ready=true");
        Ok(this)
    }

    pub async fn withdraw(&self) {
        match aws::put_ready_attribute(&self.client, &self.cluster, &self.instance, false).await {
            Ok(()) => tracing::info!("withdrew ecsmesh.ready"),
            Err(e) => tracing::warn!(error = %e, "withdrawing ecsmesh.ready failed"),
        }
    }
}
