//! `ecsmesh bootstrap` against a fixture IMDS on loopback: no root, no AWS.
use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;

use super::{BootstrapArgs, BootstrapError, bootstrap};
use crate::{config::IdentitySource, identity::tests::TempDir};

const INSTANCE: &str = "i-0123456789abcdef0";
const TOKEN: &str = "fixture-token";

/// A scratch directory with what the node's parser checks exists: the bundle and the
/// cgroup directories. Removed on drop.
struct Scratch(TempDir);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(&format!("bootstrap-{tag}"));
        std::fs::create_dir_all(dir.path().join("cgroup/ecstasks.slice")).unwrap();
        std::fs::write(dir.path().join("bundle.pem"), "anchors").unwrap();
        Self(dir)
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
}

/// IMDSv2 on 127.0.0.1: a token from `PUT /latest/api/token`, the identity document only
/// with that token.
async fn fixture_imds() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let token_ok = req
                        .headers()
                        .get("x-aws-ec2-metadata-token")
                        .is_some_and(|v| v == TOKEN);
                    let (status, body) = match (req.method().as_str(), req.uri().path(), token_ok) {
                        ("PUT", "/latest/api/token", _) => (200, TOKEN.to_owned()),
                        ("GET", "/latest/dynamic/instance-identity/document", true) => (
                            200,
                            format!(
                                r#"{{"accountId":"123456789012","instanceId":"{INSTANCE}","region":"eu-west-1","availabilityZone":"eu-west-1a"}}"#
                            ),
                        ),
                        (_, _, false) => (401, String::new()),
                        _ => (404, String::new()),
                    };
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(body)))
                            .unwrap(),
                    )
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
            );
        }
    });
    addr
}

/// The flags as the template passes them, parsed by clap like the CLI does.
fn args(dir: &Path, imds: SocketAddr, extra: &[&str]) -> BootstrapArgs {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BootstrapArgs,
    }
    let d = |p: &str| dir.join(p).display().to_string();
    let base: [(&str, String); 8] = [
        ("--cluster", "prod".into()),
        ("--trust-domain", "mesh.example".into()),
        ("--issuer-url", "https://issuer.mesh.local:8443".into()),
        ("--cgroup-root", d("cgroup/ecstasks.slice")),
        ("--ecs-cgroup-root", d("cgroup")),
        ("--bundle", d("bundle.pem")),
        ("--out", d("etc/config.toml")),
        ("--imds-url", format!("http://{imds}")),
    ];
    // A flag in `extra` replaces the base one (clap refuses a single-value flag twice).
    let mut argv = vec!["bootstrap".to_owned()];
    for (flag, value) in base {
        if !extra.contains(&flag) {
            argv.extend([flag.to_owned(), value]);
        }
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    Cli::try_parse_from(argv).unwrap().args
}

#[tokio::test]
async fn bootstrap_writes_a_config_the_node_accepts() {
    let tmp = Scratch::new("ok");
    let imds = fixture_imds().await;
    let a = args(
        tmp.path(),
        imds,
        &[
            "--cloudmap-namespace",
            "mesh.local",
            "--cloudmap-service",
            "orders,web",
            "--cloudmap-service",
            "payments",
            "--template",
            "spiffe://{trust_domain}/svc/{family}",
            "--docker-socket",
            "/run/docker.sock",
        ],
    );
    bootstrap(&a).await.unwrap();

    let out = tmp.path().join("etc/config.toml");
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // What the proxy will load: the same parser, from the file.
    let c = crate::config::Config::load(&out).unwrap();
    assert_eq!(c.instance, INSTANCE);
    assert_eq!(c.cluster, "prod");
    assert_eq!(c.cgroup_root, tmp.path().join("cgroup/ecstasks.slice"));
    assert_eq!(c.bridge_ipv4, Some("172.17.0.1".parse().unwrap()));
    let idn = c.identity.expect("[identity]");
    assert_eq!(idn.trust_domain.as_str(), "mesh.example");
    assert_eq!(idn.bundle, tmp.path().join("bundle.pem"));
    assert_eq!(
        idn.template.as_str(),
        "spiffe://{trust_domain}/svc/{family}"
    );
    match idn.source {
        IdentitySource::Issuer {
            url,
            attestation: crate::identity::remote::Attestation::Instance { imds_url },
        } => {
            assert_eq!(url.to_string(), "https://issuer.mesh.local:8443/");
            assert_eq!(imds_url.to_string(), format!("http://{imds}/"));
        }
        other => panic!("issuer mode expected, got {other:?}"),
    }
    let ecs = c.ecs.expect("[ecs]");
    assert_eq!(ecs.docker_socket, Some(PathBuf::from("/run/docker.sock")));
    assert_eq!(ecs.cgroup_root, tmp.path().join("cgroup"));
    assert!(ecs.publish_ready_attribute);
    assert_eq!(ecs.region.as_deref(), Some("eu-west-1"));
    let cm = c.cloudmap.expect("[cloudmap]");
    assert_eq!(cm.namespace, "mesh.local");
    assert_eq!(cm.services, ["orders", "web", "payments"]);
    assert_eq!(cm.region.as_deref(), Some("eu-west-1"));
}

#[tokio::test]
async fn bootstrap_region_flag_and_no_cloudmap() {
    let tmp = Scratch::new("region");
    let imds = fixture_imds().await;
    let a = args(tmp.path(), imds, &["--region", "us-east-2"]);
    let c = bootstrap(&a).await.unwrap();
    assert_eq!(c.ecs.unwrap().region.as_deref(), Some("us-east-2"));
    assert!(c.cloudmap.is_none());
    let text = std::fs::read_to_string(tmp.path().join("etc/config.toml")).unwrap();
    assert!(!text.contains("[cloudmap]"), "{text}");
    assert!(
        text.contains("docker_socket = \"/var/run/docker.sock\""),
        "{text}"
    );
}

#[tokio::test]
async fn bootstrap_writes_the_sidecars_config_too() {
    let tmp = Scratch::new("sidecar");
    let imds = fixture_imds().await;
    std::fs::create_dir_all(tmp.path().join("host-cgroup")).unwrap();
    let out = tmp.path().join("etc/sidecar.toml");
    let (out_s, cg) = (
        out.display().to_string(),
        tmp.path().join("host-cgroup").display().to_string(),
    );
    let flags = [
        "--sidecar-out",
        out_s.as_str(),
        "--sidecar-cgroup-root",
        cg.as_str(),
        "--cloudmap-namespace",
        "mesh.local",
        "--cloudmap-service",
        "orders",
    ];
    bootstrap(&args(tmp.path(), imds, &flags)).await.unwrap();
    let c = crate::config::Config::load(&out).unwrap();
    assert!(c.tasks.is_empty(), "nothing per task");
    assert!(c.ecs.is_none(), "a sidecar serves its own task only");
    assert_eq!(c.cgroup_root, tmp.path().join("host-cgroup"));
    assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/ecsmesh-sidecars"));
    match c.identity.expect("[identity]").source {
        IdentitySource::Issuer {
            attestation: crate::identity::remote::Attestation::TaskRole(t),
            ..
        } => {
            assert_eq!(t.region, "eu-west-1");
            assert_eq!(
                t.sts_url.to_string(),
                "https://sts.eu-west-1.amazonaws.com/"
            );
        }
        other => panic!("task-role attestation expected, got {other:?}"),
    }
    assert_eq!(c.cloudmap.expect("[cloudmap]").services, ["orders"]);
    // A sidecar cgroup root that is not there is refused before anything is written.
    let gone = tmp.path().join("missing").display().to_string();
    let bad = [
        "--sidecar-out",
        out_s.as_str(),
        "--sidecar-cgroup-root",
        gone.as_str(),
        "--out",
        "/nonexistent-should-not-be-written/config.toml",
    ];
    let e = bootstrap(&args(tmp.path(), imds, &bad)).await.unwrap_err();
    assert!(e.to_string().contains("--sidecar-out"), "{e}");
}

#[tokio::test]
async fn bootstrap_imds_down_is_a_clear_error() {
    let tmp = Scratch::new("imds-down");
    // A port nothing listens on any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let a = args(tmp.path(), closed, &[]);
    let e = bootstrap(&a).await.unwrap_err();
    assert!(matches!(e, BootstrapError::Imds { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("instance identity document")
            && msg.contains("IMDS")
            && msg.contains(&closed.to_string()),
        "{msg}"
    );
    assert!(!tmp.path().join("etc/config.toml").exists());
}

#[tokio::test]
async fn bootstrap_bad_flags_name_the_flag_and_write_nothing() {
    let tmp = Scratch::new("bad");
    let imds = fixture_imds().await;
    let out = tmp.path().join("etc/config.toml");
    let cases: [(&[&str], &str, &str); 4] = [
        (
            &["--issuer-url", "http://issuer.mesh.local:8443"],
            "--issuer-url",
            "identity.issuer_url",
        ),
        (
            &["--trust-domain", "Not A Domain"],
            "--trust-domain",
            "identity.trust_domain",
        ),
        (
            &["--bundle", "/nonexistent/bundle.pem"],
            "--bundle",
            "identity.bundle",
        ),
        (
            &["--cgroup-root", "/nonexistent/ecstasks.slice"],
            "--cgroup-root",
            "cgroup_root",
        ),
    ];
    for (extra, flag, field) in cases {
        let e = bootstrap(&args(tmp.path(), imds, extra)).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, BootstrapError::Rejected { .. }),
            "{extra:?}: {e:?}"
        );
        assert!(msg.starts_with(&format!("{flag}: ")), "{extra:?}: {msg}");
        assert!(msg.contains(field), "{extra:?}: {msg}");
        assert!(!out.exists(), "{extra:?}: a refused config was written");
    }
}

#[test]
fn bootstrap_flags_need_each_other_and_defaults() {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BootstrapArgs,
    }
    let base = [
        "bootstrap",
        "--cluster",
        "c",
        "--trust-domain",
        "t.example",
        "--issuer-url",
        "https://i:1",
    ];
    let a = Cli::try_parse_from(base).unwrap().args;
    assert_eq!(a.cgroup_root, Path::new("/sys/fs/cgroup/ecstasks.slice"));
    assert_eq!(a.ecs_cgroup_root, Path::new("/sys/fs/cgroup"));
    assert_eq!(a.bundle, Path::new("/etc/ecsmesh/bundle.pem"));
    assert_eq!(a.out, Path::new("/etc/ecsmesh/config.toml"));
    assert_eq!(a.docker_socket, Path::new("/var/run/docker.sock"));
    assert_eq!(a.imds_url, "http://169.254.169.254");
    let ns_only = [&base[..], &["--cloudmap-namespace", "n"]].concat();
    assert!(Cli::try_parse_from(ns_only).is_err());
    let svc_only = [&base[..], &["--cloudmap-service", "s"]].concat();
    assert!(Cli::try_parse_from(svc_only).is_err());
    assert!(
        Cli::try_parse_from(&base[..5]).is_err(),
        "--issuer-url is required"
    );
}
