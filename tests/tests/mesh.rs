//! Workload identity and the mTLS tunnel between two node proxies: traffic is encrypted on
//! the wire, both sides verify SPIFFE identities, and every way a peer can be wrong is
//! refused with a reason.
mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{mesh::*, *};
use harness::{
    NetworkMode::Host,
    ProxyOptions, World,
    capture::{self, Capture},
    metrics::counter,
    world::{client_args, run_client},
};

const MARKER: &str = "ECSMESH-PLAINTEXT-MARKER-7f3a9c";

#[test]
fn tunnel_carries_bytes_intact_and_the_wire_never_shows_plaintext() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let (a, b) = (&m.w.instances[0], &m.w.instances[1]);

    // p0 is instance 0's port on the fabric bridge: frames forwarded between bridge ports
    // are seen on the ports, not on the bridge device itself.
    let cap = Capture::start(&m.w.fabric, "p0");
    let mut args = client_args(&[m.ep], 3, 64 * 1024);
    args.extend(["--marker".into(), MARKER.into()]);
    let reports = run_client(a.tasks[0].meshtool(0, &args));
    let wire = cap.stop();
    assert_redirected(&reports, a.outbound_v4(Host));
    assert!(
        wire.len() > 3 * 64 * 1024,
        "the capture saw the tunnel traffic ({} bytes)",
        wire.len()
    );
    assert!(
        !capture::contains(&wire, MARKER.as_bytes()),
        "plaintext marker leaked onto the wire"
    );

    // Control: the same payload sent by an unenrolled process bypasses the mesh and is
    // visible on the wire, so the capture does see payloads.
    let cap = Capture::start(&m.w.fabric, "p0");
    assert_direct(&run_client(a.unenrolled(&args)));
    assert!(
        capture::contains(&cap.stop(), MARKER.as_bytes()),
        "control capture must see the marker"
    );

    let (id_a, id_b) = (m.w.identity(&m.fam_a), m.w.identity(&m.fam_b));
    let ma = a.metrics();
    let pair = [
        ("role", "client"),
        ("source_identity", id_a.as_str()),
        ("destination_identity", id_b.as_str()),
    ];
    assert_eq!(
        counter(&ma, "ecsmesh_tls_handshakes_total", &pair),
        1.0,
        "three streams, one pooled handshake"
    );
    let mb = b.metrics();
    let streams = [
        ("source_identity", id_a.as_str()),
        ("destination_family", m.fam_b.as_str()),
    ];
    assert_eq!(
        counter(&mb, "ecsmesh_tunnel_inbound_streams_total", &streams),
        3.0
    );
    assert_eq!(
        counter(
            &mb,
            "ecsmesh_tls_handshakes_total",
            &[("role", "server"), ("source_identity", id_a.as_str())]
        ),
        1.0
    );
}

#[test]
fn a_valid_probe_is_accepted_so_the_rejection_tests_mean_something() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let good = valid_client_cert(&m);
    let p = probe(&m, Some(&good), m.ep);
    assert_eq!(p["echo_ok"], true, "{p}");
}

#[test]
fn client_cert_from_another_ca_is_rejected() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let other = m.w.workdir.join("other-ca");
    m.w.ca(&[
        "init",
        "--trust-domain",
        TRUST_DOMAIN,
        "--out",
        &other.display().to_string(),
    ]);
    let cert = issue(
        &m.w,
        "other",
        &[
            "--ca",
            &other.display().to_string(),
            "--uri",
            &m.w.identity(&m.fam_a),
        ],
    );
    let p = probe(&m, Some(&cert), m.ep);
    assert_rejected(&m, &p, "unknown_ca");
}

/// The root stays offline and signs issuing CAs only: a leaf it signed itself is refused
/// at the tunnel port, though it chains to the anchor and names a valid identity.
#[test]
fn a_leaf_signed_directly_by_the_root_is_refused() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let cert = issue(
        &m.w,
        "root-signed",
        &[
            "--ca",
            &m.w.ca_dir().display().to_string(),
            "--uri",
            &m.w.identity(&m.fam_a),
        ],
    );
    assert_rejected(&m, &probe(&m, Some(&cert), m.ep), "issued_by_anchor");
    // The same identity through the instance issuer is accepted.
    let good = issued_by_a(&m, "issued", &m.w.identity(&m.fam_a));
    assert_eq!(probe(&m, Some(&good), m.ep)["echo_ok"], true);
}

#[test]
fn expired_client_cert_is_rejected() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let args = [
        "--ca",
        &m.w.ca_dir().display().to_string(),
        "--issuer",
        &issuer_a(&m),
        "--uri",
        &m.w.identity(&m.fam_a),
        "--lifetime-secs",
        "60",
        "--not-before-secs-ago",
        "3600",
    ];
    let cert = issue(&m.w, "expired", &args);
    assert_rejected(&m, &probe(&m, Some(&cert), m.ep), "expired");
}

#[test]
fn wrong_trust_domain_is_rejected() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let cert = issue(
        &m.w,
        "td",
        &[
            "--ca",
            &m.w.ca_dir().display().to_string(),
            "--uri",
            "spiffe://evil.example/ecs/test/inst0-app0",
        ],
    );
    assert_rejected(&m, &probe(&m, Some(&cert), m.ep), "trust_domain");
}

#[test]
fn two_uri_sans_are_rejected() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let id = m.w.identity(&m.fam_a);
    let cert = issue(
        &m.w,
        "two",
        &[
            "--ca",
            &m.w.ca_dir().display().to_string(),
            "--uri",
            &id,
            "--uri",
            &format!("{id}-twin"),
        ],
    );
    assert_rejected(&m, &probe(&m, Some(&cert), m.ep), "multiple_uri_sans");
}

#[test]
fn no_uri_san_is_rejected() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let cert = issue(&m.w, "none", &["--ca", &m.w.ca_dir().display().to_string()]);
    assert_rejected(&m, &probe(&m, Some(&cert), m.ep), "no_uri_san");
}

#[test]
fn self_signed_leaf_is_rejected() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let cert = issue(
        &m.w,
        "self",
        &[
            "--ca",
            &m.w.ca_dir().display().to_string(),
            "--self-signed",
            "--uri",
            &m.w.identity(&m.fam_a),
        ],
    );
    assert_rejected(&m, &probe(&m, Some(&cert), m.ep), "unknown_ca");
}

#[test]
fn no_client_cert_is_rejected() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    assert_rejected(&m, &probe(&m, None, m.ep), "no_certificate");
}

#[test]
fn connect_target_not_on_that_instance_is_refused() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    let good = valid_client_cert(&m);
    // A meshed endpoint, but on instance 0: instance 1 is not an open relay.
    let p = probe(&m, Some(&good), m.w.instances[0].addr(9000));
    assert_eq!(p["statuses"][0], 403, "{p}");
    assert_rejected(&m, &p, "not_local_endpoint");
}

#[test]
fn authorization_deny_closes_the_task_connection() {
    let deny_all_but_x = ProxyOptions {
        allow: vec![(
            format!("spiffe://{TRUST_DOMAIN}/ecs/test/somebody-else"),
            None,
            None,
        )],
        ..Default::default()
    };
    let m = mesh(ProxyOptions::default(), deny_all_but_x);
    let r = m.w.instances[0].tasks[0].client(&[m.ep], 1, 100);
    assert!(!r[0].ok, "denied flow must not reach the server: {r:?}");
    let mb = m.w.instances[1].metrics();
    assert_eq!(
        counter(
            &mb,
            "ecsmesh_tunnel_rejected_total",
            &[("reason", "authorization_denied")]
        ),
        1.0
    );
    let ma = m.w.instances[0].metrics();
    assert_eq!(
        counter(
            &ma,
            "ecsmesh_tcp_connections_failed_total",
            &[("reason", "tunnel_refused")]
        ),
        1.0
    );
    let log = m.w.instances[1].proxy_log();
    assert!(
        log.contains("authorization_denied") && log.contains(&m.w.identity(&m.fam_a)),
        "log names both: {log}"
    );
}

#[test]
fn destination_presenting_the_wrong_identity_is_refused_by_the_outbound_side() {
    let m = mesh(ProxyOptions::default(), ProxyOptions::default());
    // A fake "destination proxy" on instance 1 with a valid certificate of another identity.
    let intruder = issued_by_a(&m, "intruder", &m.w.identity("intruder"));
    let fake = SocketAddr::new(m.w.instances[1].ipv4.into(), 16008);
    let (c, k) = (
        intruder.0.display().to_string(),
        intruder.1.display().to_string(),
    );
    // The discovery entry for 10.0.0.2:9001 points its tunnel at the fake proxy.
    let discovery = m.w.instances[0].mesh.as_ref().unwrap().discovery.clone();
    let extra = format!(
        "[[services]]\nname = \"svc-fake\"\n[[services.endpoints]]\naddress = \"{}\"\nfamily = \"{}\"\ntunnel = \"{fake}\"\n",
        m.w.instances[1].addr(9001),
        m.fam_b
    );
    let mut text = std::fs::read_to_string(&discovery).unwrap();
    text.push_str(&extra);
    let mut m = m;
    std::fs::write(&discovery, text).unwrap();
    m.w.instances[1].server(&[
        "tls-server".into(),
        "--listen".into(),
        fake.to_string(),
        "--cert".into(),
        c,
        "--key".into(),
        k,
    ]);
    // Restart instance 0's proxy so it reads the new discovery file.
    m.w.instances[0].stop_proxy();
    m.w.instances[0].start_proxy(&ProxyOptions::default());
    let r = m.w.instances[0].tasks[0].client(&[m.w.instances[1].addr(9001)], 1, 100);
    assert!(!r[0].ok, "{r:?}");
    let ma = m.w.instances[0].metrics();
    assert_eq!(
        counter(
            &ma,
            "ecsmesh_tunnel_rejected_total",
            &[("side", "client"), ("reason", "identity_mismatch")]
        ),
        1.0
    );
}

/// With the default configuration the tunnel listens on both families: a service with an
/// IPv4 and an IPv6 endpoint is reached through the tunnel on either.
#[test]
fn ipv4_and_ipv6_endpoints_of_one_service_both_go_through_the_tunnel() {
    let mut w = World::new(tools(), 2);
    w.enable_mesh(TRUST_DOMAIN);
    w.add_task(0, Host, 1);
    w.add_task(1, Host, 1);
    let (v4, v6) = (w.instances[1].addr(9000), w.instances[1].addr6(9000));
    w.instances[1].echo_server(&[v4, v6]);
    let fam = w.instances[1].tasks[0].family.clone();
    std::fs::write(
        w.workdir.join("discovery.toml"),
        format!(
            "[[services]]\nname = \"svc\"\n\
             [[services.endpoints]]\naddress = \"{v4}\"\nfamily = \"{fam}\"\n\
             [[services.endpoints]]\naddress = \"{v6}\"\nfamily = \"{fam}\"\n"
        ),
    )
    .unwrap();
    w.instances[1].start_proxy(&ProxyOptions::default());
    w.instances[0].start_proxy(&ProxyOptions::default());
    let a = &w.instances[0];
    assert_redirected(&a.tasks[0].client(&[v4], 2, 1024), a.outbound_v4(Host));
    assert_redirected(&a.tasks[0].client(&[v6], 2, 1024), a.outbound_v6(Host));
    let mb = w.instances[1].metrics();
    assert_eq!(
        counter(&mb, "ecsmesh_tunnel_inbound_streams_total", &[]),
        4.0,
        "all four connections arrived through the tunnel"
    );
}

/// An identity callers cannot render (the template names the task's IAM role, which
/// discovery does not know): discovery names it, and the caller expects exactly that.
#[test]
fn discovery_names_an_identity_the_caller_cannot_render() {
    let role_template = "spiffe://{trust_domain}/role/{task_role}";
    let m = mesh(
        ProxyOptions::default(),
        ProxyOptions {
            identity_template: Some(role_template.into()),
            task_role: Some("orders-role".into()),
            ..Default::default()
        },
    );
    let a = &m.w.instances[0];
    // Rendered from the family, the expected identity is not the one instance 1's task
    // holds: the connection fails closed.
    let before = a.tasks[0].client(&[m.ep], 1, 256);
    assert!(!before[0].ok, "{before:?}");
    // Discovery names the endpoint's identity (as Cloud Map's `ecsmesh.identity` would).
    let named = format!("spiffe://{TRUST_DOMAIN}/role/orders-role");
    let discovery = a.mesh.as_ref().unwrap().discovery.clone();
    std::fs::write(
        &discovery,
        format!(
            "[[services]]\nname = \"svc-b\"\n[[services.endpoints]]\naddress = \"{}\"\nfamily = \"{}\"\nidentity = \"{named}\"\n",
            m.ep, m.fam_b
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = a.tasks[0].client(&[m.ep], 1, 256);
        if r[0].ok {
            assert_redirected(&r, a.outbound_v4(Host));
            break;
        }
        assert!(Instant::now() < deadline, "never connected: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The tunnel stream was accepted under the named identity.
    let mb = m.w.instances[1].metrics();
    assert!(
        counter(
            &mb,
            "ecsmesh_tunnel_inbound_streams_total",
            &[("destination_family", m.fam_b.as_str())]
        ) >= 1.0
    );
    assert!(
        m.w.instances[1].proxy_log().contains(&named),
        "instance 1 issued its task the role identity"
    );
}
