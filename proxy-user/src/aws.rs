//! The AWS SDK setup shared by every AWS call of the node (Cloud Map discovery, ECS
//! container-instance attributes), and the `ecsmesh.ready` attribute itself.
//!
//! Why this module exists instead of `aws_config::load_from_env()`:
//! - The SDK's default HTTPS client is rustls on **aws-lc-rs**, whose `aws-lc-sys` build wants
//!   cmake (and nasm on some targets) and which would put a second rustls `CryptoProvider`
//!   next to the ring provider the mesh's own TLS uses. With two providers compiled in,
//!   rustls can no longer pick a process default by itself and every
//!   `ServerConfig::builder()` without an explicit provider panics. So the SDK crates are
//!   built with `default-features = false` and get an HTTP client from
//!   `aws-smithy-http-client` with rustls on **ring**, handed over explicitly; aws-lc-rs is
//!   not in the dependency tree at all (`cargo tree -i aws-lc-rs` finds nothing).
//! - Tests point the SDK at moto on loopback: an endpoint override, static credentials, and
//!   no `data-` host prefix (see [`sdk_config`] and `crate::cloudmap`).
pub mod permissions;

use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig, retry::RetryConfig, timeout::TimeoutConfig};
use aws_credential_types::Credentials;
use aws_sdk_ecs::types::{Attribute, TargetType};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

/// Name of the container-instance attribute that says the node proxy is ready; meshed
/// services use `attribute:ecsmesh.ready == true` as a placement constraint so ECS never
/// places a task on an instance whose proxy is not redirecting yet.
pub const READY_ATTRIBUTE: &str = "ecsmesh.ready";

/// One TCP connect to an AWS endpoint; in-region endpoints answer in milliseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One HTTP attempt. Cloud Map and ECS control-plane calls are small.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole call including retries, so a refresh loop never hangs on one call.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);
/// The SDK's standard retry mode (exponential backoff with jitter, retry quota).
const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error(
        "no CA certificates in the system trust store (ca-certificates not installed?): \
         AWS APIs are reached over HTTPS and could not be verified"
    )]
    NoRootCertificates,
    #[error("AWS endpoint override {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("ECS container instance {target:?}: {message}")]
    ContainerInstance { target: String, message: String },
    /// Carries the SDK's full error chain (`DisplayErrorContext`): the top-level SDK error
    /// only says "service error" or "dispatch failure".
    #[error("ECS {operation} {name} on {target} in cluster {cluster}: {message}")]
    Attribute {
        operation: &'static str,
        name: &'static str,
        target: String,
        cluster: String,
        message: String,
    },
}

/// Install ring's rustls provider as the process default, once.
///
/// Why: rustls only picks a default provider by itself when exactly one is compiled in.
/// Today that is ring (aws-lc-rs is not in the tree), but any dependency that later enables
/// rustls' `aws_lc_rs` feature would turn every implicit `builder()` into a panic; calling
/// this first thing in `main` keeps the process on ring either way. Idempotent: a second
/// call, or a call after ring was installed elsewhere, does nothing.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race against another thread installing a provider is fine: one is set.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The SDK configuration for all AWS clients of the node.
///
/// - `endpoint`: `None` in production (regional AWS endpoints, the default credential chain:
///   environment, web identity, ECS task role, EC2 instance role). `Some(url)` points every
///   client at that URL — moto on loopback in tests — and signs with **static test
///   credentials**, because such an endpoint is an emulator that ignores signatures and the
///   machine running the tests has no AWS identity. Cloud Map clients built from a config
///   with an override also drop the `data-` host prefix (see `crate::cloudmap`).
/// - `region`: `None` takes the default region chain (`AWS_REGION`, profile, IMDS).
///
/// Plain `http://` endpoints get a client without TLS; everything else rustls on ring
/// with the platform's root certificates (the container image needs `ca-certificates`).
pub async fn sdk_config(
    endpoint: Option<&str>,
    region: Option<&str>,
) -> Result<SdkConfig, AwsError> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    loader = match endpoint {
        None => loader.http_client(https_client()?),
        Some(url) => {
            let plain_http = check_endpoint(url)?;
            tracing::info!(
                endpoint = url,
                "AWS endpoint override: static test credentials, no host prefix"
            );
            let client = if plain_http {
                aws_smithy_http_client::Builder::new().build_http()
            } else {
                https_client()?
            };
            loader
                .endpoint_url(url)
                .http_client(client)
                .credentials_provider(Credentials::new(
                    "ecsmesh-test",
                    "ecsmesh-test",
                    None,
                    None,
                    "ecsmesh-endpoint-override",
                ))
        }
    };
    Ok(loader.load().await)
}

/// The SDK's hyper client with rustls on ring instead of the default aws-lc-rs. Its
/// trust store is the system's; without any certificate there the client would panic at
/// its first request, so that is an error here, at startup.
fn https_client() -> Result<aws_smithy_runtime_api::client::http::SharedHttpClient, AwsError> {
    https_client_with(&rustls_native_certs::load_native_certs().certs)
}

fn https_client_with(
    system_roots: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<aws_smithy_runtime_api::client::http::SharedHttpClient, AwsError> {
    if system_roots.is_empty() {
        return Err(AwsError::NoRootCertificates);
    }
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::rustls(CryptoMode::Ring))
        .build_https())
}

/// An override must be an absolute http(s) URL with a host; returns whether it is plain
/// http. Checked here because the SDK would only fail at the first call, far from the
/// config that caused it.
fn check_endpoint(url: &str) -> Result<bool, AwsError> {
    let bad = |message: &str| AwsError::Endpoint {
        endpoint: url.to_owned(),
        message: message.to_owned(),
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("needs a host, e.g. http://127.0.0.1:5000"));
    }
    match uri.scheme_str() {
        Some("http") => Ok(true),
        Some("https") => Ok(false),
        _ => Err(bad("scheme must be http or https")),
    }
}

/// Publish (`ready = true`) or withdraw (`false`) the `ecsmesh.ready=true` attribute of this
/// container instance with ECS `PutAttributes` / `DeleteAttributes`.
///
/// Withdrawn by deletion rather than by writing "false" so that both placement constraint
/// styles (`attribute:ecsmesh.ready == true` and `attribute:ecsmesh.ready exists`) keep new
/// tasks off an instance whose proxy stopped. `container_instance` is the container
/// instance ARN (old or long format) or its bare ID; the call sends the bare ID with
/// `targetType = container-instance`, which ECS documents for short IDs and which moto
/// also understands. Deleting an attribute that is not set is not an error.
pub async fn put_ready_attribute(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    container_instance: &str,
    ready: bool,
) -> Result<(), AwsError> {
    let target = container_instance_id(container_instance)?;
    let attribute = Attribute::builder()
        .name(READY_ATTRIBUTE)
        // DeleteAttributes matches on the value too (ECS ignores it for deletion, moto
        // requires it to match); we only ever set "true".
        .value("true")
        .target_type(TargetType::ContainerInstance)
        .target_id(target)
        .build()
        .expect("name is set");
    let attribute_error = |operation: &'static str, message: String| AwsError::Attribute {
        operation,
        name: READY_ATTRIBUTE,
        target: container_instance.to_owned(),
        cluster: cluster.to_owned(),
        message,
    };
    if ready {
        ecs.put_attributes()
            .cluster(cluster)
            .attributes(attribute)
            .send()
            .await
            .map_err(|e| {
                attribute_error(
                    "PutAttributes",
                    aws_sdk_ecs::error::DisplayErrorContext(e).to_string(),
                )
            })?;
    } else {
        ecs.delete_attributes()
            .cluster(cluster)
            .attributes(attribute)
            .send()
            .await
            .map_err(|e| {
                attribute_error(
                    "DeleteAttributes",
                    aws_sdk_ecs::error::DisplayErrorContext(e).to_string(),
                )
            })?;
    }
    tracing::info!(
        cluster,
        container_instance,
        ready,
        "ECS container-instance attribute {READY_ATTRIBUTE} {}",
        if ready { "published" } else { "withdrawn" }
    );
    Ok(())
}

/// `arn:aws:ecs:REGION:ACCOUNT:container-instance/[CLUSTER/]ID` or `ID` → `ID`.
fn container_instance_id(target: &str) -> Result<&str, AwsError> {
    let id = match target.strip_prefix("arn:") {
        Some(_) => match target.split_once(":container-instance/") {
            Some((_, rest)) => rest.rsplit('/').next().unwrap_or_default(),
            None => "",
        },
        None => target,
    };
    if id.is_empty() || id.contains(['/', ':']) {
        return Err(AwsError::ContainerInstance {
            target: target.to_owned(),
            message: "expected a container instance ARN or ID".to_owned(),
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_system_roots_is_an_error_not_a_panic_later() {
        let e = https_client_with(&[]).expect_err("refused");
        assert!(e.to_string().contains("ca-certificates"), "{e}");
        // `cargo xtask setup` installs ca-certificates.
        let roots = rustls_native_certs::load_native_certs().certs;
        assert!(https_client_with(&roots).is_ok());
    }

    #[test]
    fn container_instance_ids_from_both_arn_formats() {
        let id = "4c6423e55ad54af697fb33ed3b5f535c";
        for target in [
            format!("arn:aws:ecs:eu-west-1:123456789012:container-instance/prod/{id}"),
            format!("arn:aws:ecs:eu-west-1:123456789012:container-instance/{id}"),
            id.to_owned(),
        ] {
            assert_eq!(container_instance_id(&target).unwrap(), id);
        }
        for bad in [
            "",
            "arn:aws:ecs:eu-west-1:123456789012:cluster/prod",
            "arn:aws:ecs:eu-west-1:123456789012:container-instance/",
            "a/b",
        ] {
            assert!(container_instance_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoint_overrides_are_checked() {
        assert!(check_endpoint("http://127.0.0.1:5000").unwrap());
        assert!(!check_endpoint("https://servicediscovery.eu-west-1.amazonaws.com").unwrap());
        for bad in ["127.0.0.1:5000", "ftp://x", "http://", "not a url"] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_crypto_provider_is_ring_and_installing_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        let installed = rustls::crypto::CryptoProvider::get_default().expect("installed");
        let ring = rustls::crypto::ring::default_provider();
        assert_eq!(
            format!("{:?}", installed.key_provider),
            format!("{:?}", ring.key_provider)
        );
    }

    #[tokio::test]
    async fn production_config_builds_without_network() {
        // Region given, so nothing asks IMDS; credentials resolve lazily at the first call.
        let config = sdk_config(None, Some("eu-west-1")).await.unwrap();
        assert_eq!(config.region().map(|r| r.as_ref()), Some("eu-west-1"));
        assert!(config.endpoint_url().is_none());
        assert!(config.http_client().is_some());
        let config = sdk_config(Some("http://127.0.0.1:9"), Some("us-east-1"))
            .await
            .unwrap();
        assert_eq!(config.endpoint_url(), Some("http://127.0.0.1:9"));
        assert!(sdk_config(Some("bogus"), None).await.is_err());
    }
}
