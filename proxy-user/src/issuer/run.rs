//! Startup of `ecsmesh issuer run`: load everything once, then serve until SIGTERM/SIGINT.
use std::{collections::HashSet, sync::Arc};

use tokio_util::sync::CancellationToken;

use super::{
    IssuerConfig,
    attest::IidVerifier,
    ca_source::{self, Authority},
    config::CaSource,
    ecs::{AwsEcs, Cached},
    metrics::IssuerMetrics,
    server::{self, App},
    service::Service,
    state::StateFile,
    sts::HttpSts,
};
use crate::{
    identity::{Issuer, TrustBundle},
    watch,
};

pub async fn run(config: IssuerConfig) -> anyhow::Result<()> {
    let sdk =
        crate::aws::sdk_config(config.aws_endpoint.as_deref(), config.region.as_deref()).await?;
    let secrets = aws_sdk_secretsmanager::Client::new(&sdk);
    let issuer = match &config.ca {
        CaSource::Dir(dir) => Issuer::load(dir)?,
        CaSource::Secret(id) => ca_source::load_secret(&secrets, id).await?,
    };
    let bundle = TrustBundle::load(&config.bundle)?;
    let authority = Arc::new(Authority::new(
        config.trust_domain.clone(),
        issuer,
        bundle,
        config.svid_lifetime,
    )?);
    let shutdown = CancellationToken::new();
    watch_ca(&config, &authority, secrets, &shutdown);
    tokio::spawn(authority.clone().keep_server_cert_fresh(shutdown.clone()));

    let state = StateFile::new(config.state_file.clone());
    state.read()?; // fail at start, not at the first request
    let service = Service {
        td: config.trust_domain.clone(),
        cluster: config.cluster.clone(),
        template: config.template.clone(),
        svid_lifetime: config.svid_lifetime,
        node_lifetime: config.node_cert_lifetime,
        authority: authority.clone(),
        iid: IidVerifier::load(&config.iid_certificates)?,
        state,
        denied: config
            .denied_instances
            .iter()
            .cloned()
            .collect::<HashSet<_>>(),
        ecs: Arc::new(Cached::new(AwsEcs::new(&sdk, config.cluster.clone()))),
        sts: match &config.sts_url {
            Some(url) => {
                let sts = HttpSts::new(url.clone()).map_err(|e| anyhow::anyhow!("sts_url: {e}"))?;
                tracing::info!(sts_url = %url, "task-role attestation on (/v1/task)");
                Some((url.clone(), Arc::new(sts) as Arc<dyn super::sts::Sts>))
            }
            None => None,
        },
    };
    let metrics = Arc::new(IssuerMetrics::default());
    if let Some(addr) = config.admin_addr {
        let (m, s) = (metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = super::metrics::serve_admin(addr, m, s).await {
                tracing::error!(%addr, error = %e, "issuer admin listener failed");
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(
        listen = %config.listen,
        trust_domain = %config.trust_domain,
        cluster = config.cluster,
        "issuer listening"
    );
    let app = Arc::new(App { service, metrics });
    let tls = server::tls_config(authority)?;
    let serving = tokio::spawn(server::serve(listener, tls, app, shutdown.clone()));
    wait_for_signal().await;
    tracing::info!("issuer shutting down");
    shutdown.cancel();
    let _ = serving.await;
    Ok(())
}

/// Reloads the CA (and the bundle) on change of the CA files or the bundle, and on
/// SIGHUP; a CA that fails to load or to pass the checks leaves the last good one.
fn watch_ca(
    config: &IssuerConfig,
    authority: &Arc<Authority>,
    secrets: aws_sdk_secretsmanager::Client,
    shutdown: &CancellationToken,
) {
    let mut files = vec![watch::absolute(&config.bundle)];
    if let CaSource::Dir(dir) = &config.ca {
        files.extend(ca_source::dir_files(&watch::absolute(dir)));
    }
    let (source, bundle_path, authority) =
        (config.ca.clone(), config.bundle.clone(), authority.clone());
    let handle = tokio::runtime::Handle::current();
    watch::reload_on_change_or_sighup("issuer CA", files, shutdown.clone(), move |why| {
        let (source, bundle_path, authority, secrets) = (
            source.clone(),
            bundle_path.clone(),
            authority.clone(),
            secrets.clone(),
        );
        let why = why.to_owned();
        handle.spawn(async move {
            let loaded = async {
                let issuer = match &source {
                    CaSource::Dir(dir) => Issuer::load(dir)?,
                    CaSource::Secret(id) => ca_source::load_secret(&secrets, id).await?,
                };
                let bundle = TrustBundle::load(&bundle_path)?;
                authority.replace(issuer, bundle)?;
                Ok::<_, anyhow::Error>(())
            };
            match loaded.await {
                Ok(()) => tracing::info!(trigger = why, "issuer CA reloaded"),
                Err(e) => tracing::error!(
                    trigger = why,
                    error = format!("{e:#}"),
                    "issuer CA reload failed; keeping the last good CA"
                ),
            }
        });
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
