use prometheus_client::registry::Registry;

use super::*;

/// ECS registers tasks under their task id.
const TASK: &str = "0123456789abcdef0123456789abcdef";

fn instance(health: Option<HealthStatus>, attrs: &[(&str, &str)]) -> HttpInstanceSummary {
    let mut b = HttpInstanceSummary::builder()
        .instance_id(TASK)
        .namespace_name("mesh.local")
        .service_name("orders");
    if let Some(h) = health {
        b = b.health_status(h);
    }
    for (k, v) in attrs {
        b = b.attributes(*k, *v);
    }
    b.build()
}

const FULL: &[(&str, &str)] = &[
    (ATTR_IPV4, "10.0.0.2"),
    (ATTR_PORT, "8080"),
    (ATTR_FAMILY, "orders-v2"),
    ("ECS_CLUSTER_NAME", "prod"),
];

#[test]
fn ecs_attributes_map_to_an_endpoint() {
    for health in [
        Some(HealthStatus::Healthy),
        Some(HealthStatus::UnknownValue),
        None,
    ] {
        let m = endpoint_of("orders", &instance(health, FULL), 15008).unwrap();
        assert_eq!(
            m.endpoint,
            Endpoint {
                service: "orders".into(),
                addr: "10.0.0.2:8080".parse().unwrap(),
                family: "orders-v2".into(),
                weight: 1,
                subset: None,
                tunnel: "10.0.0.2:15008".parse().unwrap(),
                task: Some(TaskId::new(TASK).unwrap()),
                identity: None,
            }
        );
        assert!(m.defaulted.is_empty());
    }
}

#[test]
fn unhealthy_instances_are_excluded() {
    let e = endpoint_of(
        "orders",
        &instance(Some(HealthStatus::Unhealthy), FULL),
        15008,
    );
    assert_eq!(e.err(), Some(Excluded::Unhealthy));
}

#[test]
fn family_and_weight_fall_back_with_a_warning() {
    let m = endpoint_of(
        "orders",
        &instance(
            None,
            &[
                (ATTR_IPV4, "10.0.0.2"),
                (ATTR_PORT, "8080"),
                (ATTR_WEIGHT, "-1"),
            ],
        ),
        15008,
    )
    .unwrap();
    assert_eq!(
        (m.endpoint.family.as_str(), m.endpoint.weight),
        ("orders", 1)
    );
    assert_eq!(m.endpoint.task, None, "not registered by ECS");
    assert_eq!(m.defaulted.len(), 2, "{:?}", m.defaulted);
    let m = endpoint_of(
        "orders",
        &instance(
            None,
            &[
                (ATTR_IPV6, "fd00::2"),
                (ATTR_PORT, "80"),
                (ATTR_WEIGHT, "0"),
                (ATTR_SUBSET, "v7"),
            ],
        ),
        15008,
    )
    .unwrap();
    assert_eq!(m.endpoint.addr, "[fd00::2]:80".parse().unwrap());
    assert_eq!(m.endpoint.tunnel, "[fd00::2]:15008".parse().unwrap());
    // Weight 0 is kept (the subset gets no new requests), not turned into 1.
    assert_eq!(m.endpoint.weight, 0);
    assert_eq!(m.endpoint.subset.as_deref(), Some("v7"));
    assert!(
        !m.defaulted.iter().any(|d| d.contains(ATTR_WEIGHT)),
        "{:?}",
        m.defaulted
    );
}

#[test]
fn instances_without_address_or_port_are_skipped() {
    for attrs in [
        &[(ATTR_PORT, "8080")][..],
        &[(ATTR_IPV4, "10.0.0.2")],
        &[(ATTR_IPV4, "10.0.0.300"), (ATTR_PORT, "8080")],
        &[(ATTR_IPV4, "10.0.0.2"), (ATTR_PORT, "0")],
        &[(ATTR_IPV4, "10.0.0.2"), (ATTR_PORT, "http")],
    ] {
        match endpoint_of("orders", &instance(None, attrs), 15008) {
            Err(Excluded::Invalid(why)) => {
                assert!(why.contains(&format!("orders/{TASK}")), "{why}")
            }
            other => panic!("{attrs:?}: {:?}", other.map(|m| m.endpoint)),
        }
    }
}

#[test]
fn an_identity_attribute_names_the_endpoint_and_a_bad_one_excludes_it() {
    let id = "spiffe://example.org/role/orders-task-role";
    let mut attrs = FULL.to_vec();
    attrs.push((ATTR_IDENTITY, id));
    let m = endpoint_of("orders", &instance(None, &attrs), 15008).unwrap();
    assert_eq!(m.endpoint.identity.unwrap().to_string(), id);
    // Without it, the caller renders the template.
    let m = endpoint_of("orders", &instance(None, FULL), 15008).unwrap();
    assert!(m.endpoint.identity.is_none());
    // Not a SPIFFE ID: left out, not guessed.
    let mut attrs = FULL.to_vec();
    attrs.push((ATTR_IDENTITY, "https://example.org/orders"));
    match endpoint_of("orders", &instance(None, &attrs), 15008) {
        Err(Excluded::Invalid(why)) => assert!(why.contains(ATTR_IDENTITY), "{why}"),
        other => panic!("{:?}", other.map(|m| m.endpoint)),
    }
}

#[test]
fn config_is_checked() {
    let good = CloudMapConfig {
        namespace: "mesh.local".into(),
        services: vec!["orders".into()],
        refresh: Duration::from_secs(5),
        endpoint: None,
        region: None,
    };
    assert!(check_config(&good).is_ok());
    for bad in [
        CloudMapConfig {
            namespace: String::new(),
            ..good.clone()
        },
        CloudMapConfig {
            services: vec![],
            ..good.clone()
        },
        CloudMapConfig {
            services: vec![String::new()],
            ..good.clone()
        },
        CloudMapConfig {
            refresh: Duration::ZERO,
            ..good.clone()
        },
    ] {
        assert!(check_config(&bad).is_err(), "{bad:?}");
    }
}

#[test]
fn metrics_have_the_documented_names() {
    let metrics = CloudMapMetrics::default();
    let mut registry = Registry::with_prefix("ecsmesh");
    metrics.register(&mut registry);
    metrics.record_ok(&Snapshot {
        endpoints: vec![],
        unhealthy: 2,
        invalid: 0,
    });
    metrics.record_error();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "ecsmesh_cloudmap_refresh_total{result=\"ok\"} 1",
        "ecsmesh_cloudmap_refresh_total{result=\"error\"} 1",
        "ecsmesh_cloudmap_endpoints 0",
        "ecsmesh_cloudmap_excluded_instances{reason=\"unhealthy\"} 2",
        "ecsmesh_cloudmap_last_success_timestamp_seconds ",
    ] {
        assert!(text.contains(line), "{line} missing in\n{text}");
    }
}
