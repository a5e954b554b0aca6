//! Cloud Map discovery and the ECS readiness attribute against moto on loopback: the real
//! SDK, the real wire protocol, moto's implementation of the services.
#[path = "support/moto.rs"]
mod moto;

use std::time::{Duration, Instant};

use aws_sdk_ecs::types::TargetType;
use aws_sdk_servicediscovery::types::{
    CustomHealthStatus, HealthCheckCustomConfig, OperationTargetType,
};
use ecsmesh::{
    aws::{READY_ATTRIBUTE, put_ready_attribute, sdk_config},
    cloudmap::{CloudMapConfig, CloudMapError, CloudMapMetrics, CloudMapSource},
    discovery::{Discovery, Endpoint},
    types::TaskId,
};
use moto::{Moto, REGION};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const NAMESPACE: &str = "mesh.local";
const INBOUND_PORT: u16 = 15008;
/// ECS registers each task in Cloud Map under its task id.
const ORDERS_A: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
const ORDERS_B: &str = "1a1b2c3d4e5f60718293a4b5c6d7e8f9";
const ORDERS_SICK: &str = "2a1b2c3d4e5f60718293a4b5c6d7e8f9";
const BILLING: &str = "3a1b2c3d4e5f60718293a4b5c6d7e8f9";
const BILLING_NO_PORT: &str = "4a1b2c3d4e5f60718293a4b5c6d7e8f9";

fn config(moto: &Moto, services: &[&str], refresh: Duration) -> CloudMapConfig {
    CloudMapConfig {
        namespace: NAMESPACE.into(),
        services: services.iter().map(|s| (*s).to_owned()).collect(),
        refresh,
        endpoint: Some(moto.endpoint()),
        region: Some(REGION.into()),
    }
}

async fn clients(moto: &Moto) -> (aws_sdk_servicediscovery::Client, aws_sdk_ecs::Client) {
    let sdk = sdk_config(Some(&moto.endpoint()), Some(REGION))
        .await
        .unwrap();
    (
        aws_sdk_servicediscovery::Client::new(&sdk),
        aws_sdk_ecs::Client::new(&sdk),
    )
}

/// The ECS-style registration of a task: what ECS service discovery writes.
async fn register(
    sd: &aws_sdk_servicediscovery::Client,
    service_id: &str,
    task: &str,
    attrs: &[(&str, &str)],
) {
    let mut request = sd
        .register_instance()
        .service_id(service_id)
        .instance_id(task);
    for (k, v) in attrs {
        request = request.attributes(*k, *v);
    }
    request.send().await.unwrap();
}

/// A namespace with `orders` (three tasks, one unhealthy) and `billing` (one task without
/// family, one without port); returns the service ids.
async fn populate(sd: &aws_sdk_servicediscovery::Client) -> (String, String) {
    let op = sd
        .create_http_namespace()
        .name(NAMESPACE)
        .send()
        .await
        .unwrap();
    let op = sd
        .get_operation()
        .operation_id(op.operation_id().unwrap())
        .send()
        .await
        .unwrap();
    let namespace_id =
        op.operation().unwrap().targets().unwrap()[&OperationTargetType::Namespace].clone();
    let mut ids = Vec::new();
    for name in ["orders", "billing"] {
        let service = sd
            .create_service()
            .name(name)
            .namespace_id(&namespace_id)
            // Custom health checks: ECS-style services report health through the API.
            .health_check_custom_config(HealthCheckCustomConfig::builder().build())
            .send()
            .await
            .unwrap();
        ids.push(service.service().unwrap().id().unwrap().to_owned());
    }
    let (orders, billing) = (ids[0].clone(), ids[1].clone());
    let ecs_task = |ip: &'static str, family: &'static str| {
        vec![
            ("AWS_INSTANCE_IPV4", ip),
            ("AWS_INSTANCE_PORT", "8080"),
            ("AVAILABILITY_ZONE", "us-east-1a"),
            ("ECS_CLUSTER_NAME", "prod"),
            ("ECS_SERVICE_NAME", family),
            ("ECS_TASK_DEFINITION_FAMILY", family),
            ("REGION", "us-east-1"),
        ]
    };
    register(sd, &orders, ORDERS_A, &ecs_task("10.0.0.2", "orders")).await;
    let mut weighted = ecs_task("10.0.0.3", "orders");
    weighted.push(("ecsmesh.weight", "3"));
    weighted.push(("ecsmesh.subset", "v2"));
    weighted.push(("ecsmesh.identity", WEIGHTED_IDENTITY));
    register(sd, &orders, ORDERS_B, &weighted).await;
    register(sd, &orders, ORDERS_SICK, &ecs_task("10.0.0.4", "orders")).await;
    sd.update_instance_custom_health_status()
        .service_id(&orders)
        .instance_id(ORDERS_SICK)
        .status(CustomHealthStatus::Unhealthy)
        .send()
        .await
        .unwrap();
    register(
        sd,
        &billing,
        BILLING,
        &[
            ("AWS_INSTANCE_IPV4", "10.0.1.7"),
            ("AWS_INSTANCE_PORT", "9090"),
        ],
    )
    .await;
    register(
        sd,
        &billing,
        BILLING_NO_PORT,
        &[("AWS_INSTANCE_IPV4", "10.0.1.8")],
    )
    .await;
    (orders, billing)
}

fn endpoint(service: &str, addr: &str, family: &str, weight: u32, task: Option<&str>) -> Endpoint {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    Endpoint {
        service: service.into(),
        addr,
        family: family.into(),
        weight,
        // The weighted instance is the one registered with a subset.
        subset: (weight == 3).then(|| "v2".to_owned()),
        tunnel: std::net::SocketAddr::new(addr.ip(), INBOUND_PORT),
        task: task.map(|t| TaskId::new(t).unwrap()),
        // The weighted instance names its SPIFFE ID (`ecsmesh.identity`).
        identity: (weight == 3).then(|| WEIGHTED_IDENTITY.parse().unwrap()),
    }
}

/// The identity the weighted instance's `ecsmesh.identity` attribute names.
const WEIGHTED_IDENTITY: &str = "spiffe://example.org/role/orders-v2";

fn expected_initial() -> Vec<Endpoint> {
    vec![
        // No ECS_TASK_DEFINITION_FAMILY: the service name stands in, and no task is known.
        endpoint("billing", "10.0.1.7:9090", "billing", 1, None),
        endpoint("orders", "10.0.0.2:8080", "orders", 1, Some(ORDERS_A)),
        endpoint("orders", "10.0.0.3:8080", "orders", 3, Some(ORDERS_B)),
    ]
}

/// Checked first because everything else builds on it: moto's DiscoverInstances answer has
/// the API's shape (`Instances[].{InstanceId, NamespaceName, ServiceName, Attributes,
/// HealthStatus}`), so no fix-up is needed in the wrapper.
#[tokio::test]
async fn moto_answers_discover_instances_in_the_api_shape() {
    let moto = Moto::start();
    let (sd, _) = clients(&moto).await;
    populate(&sd).await;
    let (status, body) = moto
        .post(
            "servicediscovery",
            "application/x-amz-json-1.1",
            Some("Route53AutoNaming_v20170314.DiscoverInstances"),
            &format!(
                r#"{{"NamespaceName":"{NAMESPACE}","ServiceName":"orders","HealthStatus":"ALL"}}"#
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let instances = answer["Instances"].as_array().expect("Instances[]");
    assert_eq!(instances.len(), 3, "{body}");
    for instance in instances {
        let keys: std::collections::BTreeSet<&str> = instance
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "Attributes",
                "HealthStatus",
                "InstanceId",
                "NamespaceName",
                "ServiceName"
            ]
            .into(),
            "{instance}"
        );
        assert_eq!(instance["NamespaceName"], NAMESPACE);
        assert_eq!(instance["ServiceName"], "orders");
        assert!(instance["Attributes"]["AWS_INSTANCE_IPV4"].is_string());
    }
    let sick = instances
        .iter()
        .find(|i| i["InstanceId"] == ORDERS_SICK)
        .unwrap();
    assert_eq!(sick["HealthStatus"], "UNHEALTHY");
}

#[tokio::test]
async fn registered_instances_become_endpoints_and_deregistered_ones_leave() {
    let moto = Moto::start();
    let (sd, _) = clients(&moto).await;
    let (orders, _) = populate(&sd).await;
    // "ghost" does not exist in the namespace: no endpoints, and no failed refresh.
    let source = CloudMapSource::new(config(
        &moto,
        &["orders", "billing", "ghost"],
        Duration::from_secs(5),
    ))
    .await
    .unwrap();

    // Through DiscoverInstances, whose `data-` host prefix would make the call go to
    // `data-127.0.0.1` without the override handling.
    let endpoints = source.refresh(INBOUND_PORT).await.unwrap();
    assert_eq!(endpoints, expected_initial());
    let discovery = Discovery::from_endpoints(endpoints).unwrap();
    assert_eq!(discovery.service("orders").len(), 2);

    sd.deregister_instance()
        .service_id(&orders)
        .instance_id(ORDERS_A)
        .send()
        .await
        .unwrap();
    sd.update_instance_custom_health_status()
        .service_id(&orders)
        .instance_id(ORDERS_SICK)
        .status(CustomHealthStatus::Healthy)
        .send()
        .await
        .unwrap();
    let endpoints = source.refresh(INBOUND_PORT).await.unwrap();
    assert_eq!(
        endpoints,
        vec![
            endpoint("billing", "10.0.1.7:9090", "billing", 1, None),
            endpoint("orders", "10.0.0.3:8080", "orders", 3, Some(ORDERS_B)),
            endpoint("orders", "10.0.0.4:8080", "orders", 1, Some(ORDERS_SICK)),
        ]
    );
}

#[tokio::test]
async fn a_missing_namespace_fails_the_refresh() {
    let moto = Moto::start();
    let source = CloudMapSource::new(config(&moto, &["orders"], Duration::from_secs(5)))
        .await
        .unwrap();
    let err = source.refresh(INBOUND_PORT).await.unwrap_err();
    assert!(
        matches!(&err, CloudMapError::Discover { service, .. } if service == "orders"),
        "{err}"
    );
    assert!(err.to_string().contains("NamespaceNotFound"), "{err}");
}

fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

fn refreshes(metrics: &CloudMapMetrics, result: &'static str) -> u64 {
    metrics
        .refreshes
        .get_or_create(&ecsmesh::cloudmap::ResultLabels { result })
        .get()
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn api_outage_keeps_the_last_good_set_and_shows_in_metrics() {
    let mut moto = Moto::start();
    let (sd, _) = clients(&moto).await;
    populate(&sd).await;
    let source = CloudMapSource::new(config(
        &moto,
        &["orders", "billing"],
        Duration::from_millis(200),
    ))
    .await
    .unwrap();
    let metrics = CloudMapMetrics::default();
    let mut registry = Registry::with_prefix("ecsmesh");
    metrics.register(&mut registry);
    let (tx, mut updates) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let task = source.spawn(
        INBOUND_PORT,
        move |endpoints| {
            let _ = tx.send(endpoints);
        },
        shutdown.clone(),
        metrics.clone(),
    );

    let first = tokio::time::timeout(Duration::from_secs(10), updates.recv())
        .await
        .expect("first update")
        .unwrap();
    assert_eq!(first, expected_initial());
    // Unchanged sets are not re-announced.
    wait_for("a second good refresh", Duration::from_secs(10), || {
        refreshes(&metrics, "ok") >= 2
    })
    .await;
    assert!(updates.try_recv().is_err(), "unchanged set re-announced");
    let text = encode(&registry);
    assert!(text.contains("ecsmesh_cloudmap_endpoints 3"), "{text}");
    assert!(
        text.contains("ecsmesh_cloudmap_excluded_instances{reason=\"unhealthy\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("ecsmesh_cloudmap_excluded_instances{reason=\"invalid\"} 1"),
        "{text}"
    );
    let last_success = metrics.last_success.get();
    assert!(last_success > 1.7e9, "{last_success}");

    // The outage: moto is gone, every call now fails with connection refused.
    moto.stop();
    let ok_before = refreshes(&metrics, "ok");
    wait_for("two failed refreshes", Duration::from_secs(20), || {
        refreshes(&metrics, "error") >= 2
    })
    .await;
    assert!(
        refreshes(&metrics, "ok") <= ok_before + 1,
        "in-flight one at most"
    );
    assert!(
        updates.try_recv().is_err(),
        "a failed refresh reached on_update"
    );
    let text = encode(&registry);
    assert!(text.contains("ecsmesh_cloudmap_endpoints 3"), "{text}");
    assert!(
        !text.contains("ecsmesh_cloudmap_refresh_total{result=\"error\"} 0"),
        "{text}"
    );
    let stale = metrics.last_success.get();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(metrics.last_success.get(), stale, "no success while down");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("loop stops on shutdown, also mid-refresh")
        .unwrap();
}

#[tokio::test]
async fn ready_attribute_is_published_and_withdrawn() {
    let moto = Moto::start();
    let (_, ecs) = clients(&moto).await;
    ecs.create_cluster()
        .cluster_name("prod")
        .send()
        .await
        .unwrap();
    // moto's RegisterContainerInstance needs a real (moto) EC2 instance behind it.
    let ec2_instance = moto.run_ec2_instance().await;
    let registered = ecs
        .register_container_instance()
        .cluster("prod")
        .instance_identity_document(format!(r#"{{"instanceId":"{ec2_instance}"}}"#))
        .send()
        .await
        .unwrap();
    let arn = registered
        .container_instance()
        .unwrap()
        .container_instance_arn()
        .unwrap()
        .to_owned();

    let ready_targets = || async {
        ecs.list_attributes()
            .cluster("prod")
            .target_type(TargetType::ContainerInstance)
            .attribute_name(READY_ATTRIBUTE)
            .attribute_value("true")
            .send()
            .await
            .unwrap()
            .attributes()
            .iter()
            .map(|a| a.target_id().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };

    put_ready_attribute(&ecs, "prod", &arn, true).await.unwrap();
    assert_eq!(ready_targets().await, vec![arn.clone()]);
    let described = ecs
        .describe_container_instances()
        .cluster("prod")
        .container_instances(&arn)
        .send()
        .await
        .unwrap();
    let attributes = described.container_instances()[0].attributes();
    assert!(
        attributes
            .iter()
            .any(|a| a.name() == READY_ATTRIBUTE && a.value() == Some("true")),
        "{attributes:?}"
    );

    put_ready_attribute(&ecs, "prod", &arn, false)
        .await
        .unwrap();
    assert!(ready_targets().await.is_empty());
    // Withdrawing twice is fine; the bare container instance id works like the ARN.
    put_ready_attribute(&ecs, "prod", &arn, false)
        .await
        .unwrap();
    let id = arn.rsplit('/').next().unwrap();
    put_ready_attribute(&ecs, "prod", id, true).await.unwrap();
    assert_eq!(ready_targets().await, vec![arn.clone()]);

    let err = put_ready_attribute(&ecs, "prod", "0000", true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("TargetNotFoundException"), "{err}");
}
