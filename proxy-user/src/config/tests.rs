use std::path::Path;

use super::*;
use crate::identity::remote::Attestation;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("test.toml"), text)
}

const MINIMAL: &str = r#"
instance = "i-1"
cgroup_root = "/"
"#;

#[test]
fn defaults_apply() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.outbound_port, 15001);
    assert_eq!(c.admin_addr.port(), 15000);
    assert_eq!(c.pin_dir, Path::new("/sys/fs/bpf/ecsmesh"));
    assert!(c.tasks.is_empty());
}

#[test]
fn unknown_field_names_line_and_field() {
    let e = parse("instance = \"i\"\ncgroup_root = \"/\"\nbogus = 1\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("test.toml:3:"), "{e}");
    assert!(e.contains("bogus"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
}

#[test]
fn bad_cidr_names_the_entry() {
    let e = parse(&format!(
        "{MINIMAL}exclude_cidrs = [\"10.0.0.0/8\", \"10.0.0/99\"]\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("exclude_cidrs[1]"), "{e}");
}

#[test]
fn missing_cgroup_names_the_task() {
    let text = format!(
        "{MINIMAL}[[tasks]]\nid = \"t1\"\nfamily = \"web\"\nnetwork_mode = \"host\"\ncgroups = [\"/nonexistent/cg\"]\n"
    );
    let e = parse(&text).unwrap_err().to_string();
    assert!(e.contains("tasks[0].cgroups[0]"), "{e}");
}

#[test]
fn bridge_task_needs_bridge_address() {
    let text = format!(
        "{MINIMAL}[[tasks]]\nid = \"t1\"\nfamily = \"web\"\nnetwork_mode = \"bridge\"\ncgroups = [\"/\"]\n"
    );
    let e = parse(&text).unwrap_err().to_string();
    assert!(e.contains("tasks[0].network_mode"), "{e}");
    let ok = format!("bridge_ipv4 = \"172.17.0.1\"\n{text}");
    let c = parse(&ok).unwrap();
    let addrs = c.outbound_listen_addrs();
    assert_eq!(addrs, vec!["172.17.0.1:15001".parse().unwrap()]);
}

#[test]
fn duplicate_task_and_bad_mode_are_rejected() {
    let task =
        "[[tasks]]\nid = \"t1\"\nfamily = \"web\"\nnetwork_mode = \"host\"\ncgroups = [\"/\"]\n";
    let e = parse(&format!("{MINIMAL}{task}{task}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("tasks[1].id"), "{e}");
    let e = parse(&format!(
        "{MINIMAL}{}",
        task.replace("\"host\"", "\"awsvpc\"")
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("awsvpc") && e.starts_with("test.toml:"), "{e}");
}

#[test]
fn type_errors_quote_the_line_with_the_field() {
    let e = parse(&format!("{MINIMAL}outbound_port = \"x\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("test.toml:4:"), "{e}");
    assert!(e.contains("outbound_port"), "{e}");
}

#[test]
fn an_agent_url_the_client_cannot_use_fails_at_load() {
    for (url, why) in [
        ("not a uri", "invalid"),
        ("https://127.0.0.1:51678", "scheme must be http"),
    ] {
        let e = parse(&format!(
            "{MINIMAL}[ecs]\ncgroup_root = \"/\"\nagent_url = \"{url}\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("ecs.agent_url") && e.contains(why), "{url}: {e}");
    }
    let c = parse(&format!(
        "{MINIMAL}[ecs]\ncgroup_root = \"/\"\nagent_url = \"http://127.0.0.1:51678\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.ecs.unwrap().agent_url,
        "http://127.0.0.1:51678".parse::<http::Uri>().unwrap()
    );
}

#[test]
fn limits_default_and_parse_into_durations() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.limits.tunnel_keepalive_interval, Duration::from_secs(10));
    assert_eq!(c.limits.tunnel_keepalive_timeout, Duration::from_secs(5));
    assert_eq!(c.limits.tunnel_idle_timeout, Duration::from_secs(300));
    assert_eq!(
        c.limits.tcp_idle_timeout, None,
        "no TCP idle timeout by default"
    );
    let c = parse(&format!(
        "tunnel_keepalive_interval_secs = 1\ntunnel_keepalive_timeout_secs = 2\n\
         tcp_idle_timeout_secs = 3600\ntunnel_handshake_cap = 8\nmax_connections_per_task = 10\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.limits.tunnel_keepalive_interval, Duration::from_secs(1));
    assert_eq!(c.limits.tunnel_keepalive_timeout, Duration::from_secs(2));
    assert_eq!(c.limits.tcp_idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(c.limits.tunnel_handshake_cap, 8);
    assert_eq!(c.limits.max_connections_per_task, 10);
}

#[test]
fn zero_or_bad_limits_are_rejected_by_name() {
    for field in [
        "tunnel_keepalive_interval_secs",
        "tunnel_keepalive_timeout_secs",
        "tunnel_idle_timeout_secs",
        "tunnel_connect_timeout_secs",
        "tunnel_handshake_cap",
        "max_connections_per_task",
        "tcp_idle_timeout_secs",
    ] {
        let e = parse(&format!("{field} = 0\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(field) && e.contains("at least 1"),
            "{field}: {e}"
        );
        let e = parse(&format!("{field} = -5\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    let e = parse(&format!(
        "tunnel_keepalive_interval_secs = \"10s\"\n{MINIMAL}"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("tunnel_keepalive_interval_secs"), "{e}");
}

#[test]
fn traces_parse_with_defaults_and_reject_bad_values() {
    assert!(parse(MINIMAL).unwrap().traces.is_none(), "off by default");
    let c = parse(&format!(
        "{MINIMAL}[traces]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\n"
    ))
    .unwrap();
    let t = c.traces.unwrap();
    assert_eq!(t.otlp_endpoint, "http://127.0.0.1:4318/v1/traces");
    assert_eq!(t.sample_ratio, traces::DEFAULT_SAMPLE_RATIO);
    assert!(t.max_batch <= t.max_queue);
    for (body, field) in [
        ("otlp_endpoint = \"127.0.0.1:4318\"", "traces.otlp_endpoint"),
        ("otlp_endpoint = \"grpc://c:4317\"", "traces.otlp_endpoint"),
        ("otlp_endpoint = \"not a url\"", "traces.otlp_endpoint"),
        (
            "otlp_endpoint = \"http://c/v1/traces\"\nsample_ratio = 1.5",
            "traces.sample_ratio",
        ),
        (
            "otlp_endpoint = \"http://c/v1/traces\"\nsample_ratio = -0.1",
            "traces.sample_ratio",
        ),
        (
            "otlp_endpoint = \"http://c/v1/traces\"\nmax_queue = 0",
            "traces.max_queue",
        ),
        (
            "otlp_endpoint = \"http://c/v1/traces\"\nmax_queue = 10\nmax_batch = 11",
            "traces.max_batch",
        ),
        (
            "otlp_endpoint = \"http://c/v1/traces\"\nexport_timeout_ms = 0",
            "traces.export_timeout_ms",
        ),
        (
            "otlp_endpoint = \"http://c/v1/traces\"\nca_file = \"/etc/hostname\"",
            "traces.ca_file",
        ),
        (
            "otlp_endpoint = \"https://c/v1/traces\"\nca_file = \"/nonexistent.pem\"",
            "traces.ca_file",
        ),
    ] {
        let e = parse(&format!("{MINIMAL}[traces]\n{body}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{body}: {e}");
    }
    let e = parse(&format!("{MINIMAL}[traces]\nsample_ratio = 0.5\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("otlp_endpoint"), "the endpoint is required: {e}");
}

#[test]
fn identity_takes_a_ca_directory_or_an_issuer_but_not_both() {
    let dir = std::env::temp_dir().join(format!("ecsmesh-config-idn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, "").unwrap();
    let with = |body: &str| {
        parse(&format!(
            "{MINIMAL}[identity]\ntrust_domain = \"example.org\"\nbundle = \"{}\"\n{body}\n",
            bundle.display()
        ))
    };
    let c = with("issuer_url = \"https://issuer.mesh.internal:8443\"").unwrap();
    match c.identity.unwrap().source {
        IdentitySource::Issuer {
            url,
            attestation: Attestation::Instance { imds_url },
        } => {
            assert_eq!(url.port_u16(), Some(8443));
            assert_eq!(imds_url.host(), Some("169.254.169.254"));
        }
        other => panic!("{other:?}"),
    }
    let sidecar =
        "issuer_url = \"https://i:8443\"\nattestation = \"task_role\"\nregion = \"eu-west-1\"";
    match with(sidecar).unwrap().identity.unwrap().source {
        IdentitySource::Issuer {
            attestation: Attestation::TaskRole(t),
            ..
        } => {
            assert_eq!(
                t.sts_url.to_string(),
                "https://sts.eu-west-1.amazonaws.com/"
            );
            assert_eq!(t.region, "eu-west-1");
            assert!(t.credentials_url.is_none());
        }
        other => panic!("{other:?}"),
    }
    for (body, field) in [
        (
            "issuer_url = \"https://i:8443\"\nattestation = \"task_role\"",
            "identity.region",
        ),
        (
            "issuer_url = \"https://i:8443\"\nattestation = \"iam\"",
            "identity.attestation",
        ),
        (
            &format!("{sidecar}\nimds_url = \"http://169.254.169.254\"") as &str,
            "identity.imds_url",
        ),
        (
            "issuer_url = \"https://i:8443\"\nregion = \"eu-west-1\"",
            "identity.region",
        ),
    ] {
        let e = with(body).unwrap_err().to_string();
        assert!(e.contains(field), "{body:?}: {e}");
    }
    let c = with(&format!("issuer_dir = \"{}\"", dir.display())).unwrap();
    assert!(matches!(
        c.identity.unwrap().source,
        IdentitySource::IssuerDir(_)
    ));
    for (body, field) in [
        ("", "identity"),
        (
            &format!(
                "issuer_dir = \"{}\"\nissuer_url = \"https://i:1\"",
                dir.display()
            ) as &str,
            "identity.issuer_url",
        ),
        ("issuer_url = \"http://i:8443\"", "identity.issuer_url"),
        ("issuer_url = \"https://i:8443/v1\"", "identity.issuer_url"),
        (
            "issuer_url = \"https://i:8443\"\nimds_url = \"https://169.254.169.254\"",
            "identity.imds_url",
        ),
        (
            &format!(
                "issuer_dir = \"{}\"\nimds_url = \"http://x\"",
                dir.display()
            ) as &str,
            "identity.imds_url",
        ),
    ] {
        let e = with(body).unwrap_err().to_string();
        assert!(e.contains(field), "{body:?}: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
