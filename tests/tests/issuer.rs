//! Issuer mode end to end: `ecsmesh issuer` holds the only CA key, nodes attest with their
//! signed instance identity documents, and every SVID is named from what ECS (moto) says
//! about the task — checked against the requesting node's container instance.
mod common;
#[path = "common/issued.rs"]
mod issued;

use std::{path::PathBuf, time::Duration};

use common::{
    mesh::{TRUST_DOMAIN, sni_for},
    *,
};
use harness::{
    NetworkMode::Bridge,
    aws,
    issuer::{CsrSpec, IssuerAddr, csr},
    metrics::counter,
    process,
};
use issued::{Issued, Lifetimes, PartnerCa, files_below, identity, issue};
use serde_json::json;

const LONG: Lifetimes = Lifetimes {
    svid_secs: 3600,
    node_secs: 3600,
    ca_secret: false,
};

fn calls(m: &prometheus_parse::Scrape, call: &str, result: &str) -> f64 {
    counter(
        m,
        "ecsmesh_issuer_calls_total",
        &[("call", call), ("result", result)],
    )
}

#[test]
fn each_node_attests_and_gets_identities_for_its_own_tasks_only() {
    let s = Issued::new(LONG, None);
    // The mesh works end to end on issuer-issued identities.
    let a = &s.w.instances[0];
    assert_redirected(&s.call_orders(3), a.outbound_v4(Bridge));
    let hs = counter(
        &a.metrics(),
        "ecsmesh_tls_handshakes_total",
        &[
            ("role", "client"),
            ("source_identity", &identity("client", "client-app")),
            ("destination_identity", &identity("orders", "orders-api")),
        ],
    );
    assert!(hs >= 1.0, "a handshake between the role-named identities");
    // `{task_role}` is the role name from each task definition, and each node holds only
    // its own task's identity.
    assert!(!s.holds(0, &identity("orders", "orders-api")));
    assert!(!s.holds(1, &identity("client", "client-app")));
    for i in 0..2 {
        let m = s.w.instances[i].metrics();
        assert_eq!(
            calls(&m, "attest", "issued"),
            1.0,
            "instance {i} attested once"
        );
        assert_eq!(calls(&m, "svid", "issued"), 1.0, "instance {i}: one SVID");
    }

    // No CA key on any node: the config names no issuer directory, and the only private
    // key a node keeps is its node certificate's, which is not a CA and names the node's
    // own EC2 instance.
    for i in 0..2 {
        let inst = &s.w.instances[i];
        let config = std::fs::read_to_string(&inst.proxy.as_ref().unwrap().config).unwrap();
        assert!(!config.contains("issuer_dir"), "{config}");
        let mesh_dir = inst.mesh.as_ref().unwrap().issuer_dir.clone();
        let mut keys: Vec<PathBuf> = [mesh_dir, s.state_dir(i)]
            .iter()
            .flat_map(|d| files_below(d))
            .filter(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains("PRIVATE KEY")))
            .collect();
        keys.sort();
        let (node_pem, node_key) = s.node_cert(i);
        assert_eq!(keys, vec![node_key], "instance {i}'s private keys");
        let pem = std::fs::read(&node_pem).unwrap();
        let (_, leaf) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = leaf.parse_x509().unwrap();
        assert!(!cert.is_ca(), "the node certificate is not a CA");
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(
            uris,
            vec![format!(
                "URI(spiffe://{TRUST_DOMAIN}/ecsmesh/node/{})",
                s.ec2[i]
            )]
        );
    }

    // A restarted proxy (an upgrade) renews with its saved node certificate instead of
    // attesting again, which the issuer would refuse as a replay while it is valid; and
    // its restored task gets its certificate even while the ECS agent is down.
    let mut s = s;
    s.w.instances[1].stop_proxy();
    s.agents[1].set("/v1/tasks", 500, "{\"error\":\"agent down\"}");
    let opts = s.proxy_options(1);
    s.w.instances[1].spawn_proxy(&opts);
    s.wait_until(
        "the restarted proxy holds its task's identity",
        Duration::from_secs(20),
        |s| s.holds(1, &identity("orders", "orders-api")),
    );
    let m = s.w.instances[1].metrics();
    assert_eq!(calls(&m, "attest", "issued"), 0.0, "no second attestation");
    assert_eq!(calls(&m, "svid", "issued"), 1.0);
    let im = s.issuer_metrics();
    let attests = |result| {
        counter(
            &im,
            "ecsmesh_issuer_requests_total",
            &[("endpoint", "attest"), ("result", result)],
        )
    };
    assert_eq!(
        (attests("issued"), attests("replayed_attestation")),
        (2.0, 0.0)
    );
    assert_redirected(&s.call_orders(2), s.w.instances[0].outbound_v4(Bridge));
    assert!(
        s.w.instances[1]
            .proxy_log()
            .contains("ECS agent poll failed")
            || s.w.instances[1]
                .proxy_log()
                .contains("waiting for the ECS agent"),
        "the agent was down throughout"
    );
}

#[test]
fn the_issuer_refuses_what_ecs_and_the_attestation_do_not_back() {
    // The issuer also trusts a partner trust domain's anchor (federation), so a node
    // certificate from there chains and is refused for its trust domain alone.
    let partner = PartnerCa::new();
    let s = Issued::new(LONG, Some(partner.bundle()));
    let node_a = s.node_cert(0);
    let a = s.issuer_addr(0);
    let post = |path: &str, body: serde_json::Value, cert: Option<&(PathBuf, PathBuf)>| {
        let (status, text) = a.post(
            path,
            body.to_string().as_bytes(),
            cert.map(|(c, k)| (c.as_path(), k.as_path())),
        );
        (status, IssuerAddr::reason(&text))
    };
    let fresh = || csr(CsrSpec::default()).0;

    // The control: node A may renew its node certificate and get its own task's SVID.
    assert_eq!(
        post("/v1/node", json!({ "csr": fresh() }), Some(&node_a)).0,
        200
    );
    let own = json!({ "task_arn": s.client.arn, "csr": fresh() });
    assert_eq!(post("/v1/svid", own, Some(&node_a)).0, 200);

    // A task that runs on B, asked for by A.
    let on_b = json!({ "task_arn": s.orders.arn, "csr": fresh() });
    assert_eq!(
        post("/v1/svid", on_b, Some(&node_a)),
        (403, "not_on_instance".into())
    );
    // A stopped task on A's own instance.
    let stopped = s.moto.ecs(
        "StartTask",
        json!({ "cluster": "test", "taskDefinition": "client", "containerInstances": [s.ci[0]] }),
    )["tasks"][0]["taskArn"]
        .as_str()
        .unwrap()
        .to_owned();
    s.moto
        .ecs("StopTask", json!({ "cluster": "test", "task": stopped }));
    let body = json!({ "task_arn": stopped, "csr": fresh() });
    assert_eq!(
        post("/v1/svid", body, Some(&node_a)),
        (403, "task_not_running".into())
    );

    // Attestations: an EC2 instance that is not a container instance of the cluster
    // (correctly signed), a forged document, a replay of A's own.
    let outsider = s.moto.run_instance();
    let doc = aws::identity_document(&outsider);
    let body = json!({ "document": doc, "signature": aws::sign_document(&doc), "csr": fresh() });
    assert_eq!(
        post("/v1/attest", body, None),
        (403, "not_in_cluster".into())
    );
    let (doc_a, sig_a) = &s.documents[0];
    let forged = doc_a.replace(&s.ec2[0], &s.ec2[1]);
    let body = json!({ "document": forged, "signature": sig_a, "csr": fresh() });
    assert_eq!(
        post("/v1/attest", body, None),
        (403, "forged_attestation".into())
    );
    let body = json!({ "document": doc_a, "signature": sig_a, "csr": fresh() });
    assert_eq!(
        post("/v1/attest", body, None),
        (403, "replayed_attestation".into())
    );

    // Client certificates that are not a node certificate of ours.
    let foreign = partner.node_cert(&s.w, &s.ec2[0]);
    let body = json!({ "task_arn": s.client.arn, "csr": fresh() });
    assert_eq!(
        post("/v1/svid", body.clone(), Some(&foreign)),
        (403, "foreign_trust_domain".into())
    );
    let workload = issue(
        &s.w,
        "workload",
        &[
            "--issuer",
            &s.w.issuer_ca_dir().display().to_string(),
            "--uri",
            &identity("client", "client-app"),
        ],
    );
    assert_eq!(
        post("/v1/svid", body.clone(), Some(&workload)),
        (403, "not_a_node_certificate".into())
    );
    assert_eq!(
        post("/v1/svid", body, None),
        (401, "no_node_certificate".into())
    );

    // Bad input: a malformed CSR, a CSR asking for a SAN or a CA certificate, a huge body,
    // a client that connects and sends nothing.
    let bad = |csr: String| post("/v1/node", json!({ "csr": csr }), Some(&node_a));
    assert_eq!(
        bad(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into()
        )
        .1,
        "malformed_csr"
    );
    let uri = identity("orders", "orders-api");
    let with_san = csr(CsrSpec {
        san_uri: Some(&uri),
        ca: false,
    })
    .0;
    assert_eq!(bad(with_san), (400, "csr_extra_sans".into()));
    assert_eq!(
        bad(csr(CsrSpec {
            san_uri: None,
            ca: true
        })
        .0),
        (400, "csr_ca".into())
    );
    let huge = vec![b'x'; 4 << 20];
    let (status, text) = a.post("/v1/node", &huge, None);
    assert_eq!(
        (status, IssuerAddr::reason(&text)),
        (413, "body_too_large".into())
    );
    let silent = s.w.instances[0].netns.run(|| {
        std::net::TcpStream::connect_timeout(
            &format!("10.0.0.2:{}", issued::ISSUER_PORT).parse().unwrap(),
            Duration::from_secs(2),
        )
        .unwrap()
    });
    assert_eq!(
        post("/v1/node", json!({ "csr": fresh() }), Some(&node_a)).0,
        200,
        "the issuer still serves"
    );
    drop(silent);

    // Each refusal was counted under its reason.
    let m = s.issuer_metrics();
    for (endpoint, reason) in [
        ("svid", "not_on_instance"),
        ("svid", "task_not_running"),
        ("attest", "not_in_cluster"),
        ("attest", "forged_attestation"),
        ("attest", "replayed_attestation"),
        ("svid", "foreign_trust_domain"),
        ("svid", "not_a_node_certificate"),
        ("node", "csr_extra_sans"),
        ("node", "csr_ca"),
    ] {
        let n = counter(
            &m,
            "ecsmesh_issuer_requests_total",
            &[("endpoint", endpoint), ("result", reason)],
        );
        assert_eq!(n, 1.0, "{endpoint} {reason}");
    }

    // A node certificate is not a workload identity: B's tunnel port refuses it.
    let b = &s.w.instances[1];
    let args: Vec<String> = vec![
        "tunnel".into(),
        "--connect".into(),
        format!("{}:15008", b.ipv4),
        "--sni".into(),
        sni_for(&identity("orders", "orders-api")),
        "--target".into(),
        s.ep.to_string(),
        "--payload-bytes".into(),
        "100".into(),
        "--cert".into(),
        node_a.0.display().to_string(),
        "--key".into(),
        node_a.1.display().to_string(),
    ];
    let out = process::run(s.w.instances[0].unenrolled(&args));
    let probe: serde_json::Value = serde_json::from_slice(&out.stdout).expect("tunnel json");
    assert_ne!(probe["echo_ok"], true, "{probe}");
    let n = counter(
        &b.metrics(),
        "ecsmesh_tunnel_rejected_total",
        &[("side", "server"), ("reason", "mesh_identity")],
    );
    assert_eq!(n, 1.0, "{probe}");
    // And the mesh still works.
    assert_redirected(&s.call_orders(1), s.w.instances[0].outbound_v4(Bridge));
}

#[test]
fn an_issuer_outage_shorter_than_the_svid_lifetime_is_invisible() {
    // 20 s SVIDs, renewed at half life (10 s): every certificate has at least 10 s left
    // at any moment, so a 6 s outage must not be seen whenever it starts. (A shorter
    // lifetime made this depend on the two nodes' renewal phases: a node renewing just
    // before the outage left its peer's certificate as little as 5 s.)
    let mut s = Issued::new(
        Lifetimes {
            svid_secs: 20,
            node_secs: 3600,
            ca_secret: false,
        },
        None,
    );
    let via = s.w.instances[0].outbound_v4(Bridge);
    assert_redirected(&s.call_orders(1), via);
    // Stop the issuer 2 s before instance 0's next renewal is due, so that renewal and
    // its retries meet the outage.
    let before = calls(&s.w.instances[0].metrics(), "svid", "issued");
    s.wait_until("a renewal", Duration::from_secs(25), |s| {
        calls(&s.w.instances[0].metrics(), "svid", "issued") > before
    });
    let renewed = std::time::Instant::now();
    while renewed.elapsed() < Duration::from_secs(8) {
        assert_redirected(&s.call_orders(1), via);
        std::thread::sleep(Duration::from_millis(300));
    }
    s.stop_issuer();
    let down = std::time::Instant::now();
    let mut calls_during = 0;
    while down.elapsed() < Duration::from_secs(6) {
        assert_redirected(&s.call_orders(1), via);
        calls_during += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    let m = s.w.instances[0].metrics();
    assert!(
        calls(&m, "svid", "unreachable") >= 1.0,
        "the gap shows in metrics"
    );
    eprintln!(
        "issuer outage: {calls_during} client runs in 6 s, all ok; {} renewal attempts unreachable",
        calls(&m, "svid", "unreachable")
    );
    let issued = calls(&m, "svid", "issued");
    s.start_issuer();
    s.wait_until("renewals resume", Duration::from_secs(10), |s| {
        calls(&s.w.instances[0].metrics(), "svid", "issued") > issued
            && calls(&s.w.instances[1].metrics(), "svid", "issued") > 1.0
    });
    assert_redirected(&s.call_orders(2), via);
}

#[test]
fn a_denied_instance_is_cut_off_when_its_certificate_lapses() {
    // This issuer holds its CA in Secrets Manager (moto), not in a directory.
    let s = Issued::new(
        Lifetimes {
            svid_secs: 6,
            node_secs: 3600,
            ca_secret: true,
        },
        None,
    );
    let via = s.w.instances[0].outbound_v4(Bridge);
    assert_redirected(&s.call_orders(1), via);
    let out = std::process::Command::new(&s.w.tools.ecsmesh)
        .args(["issuer", "deny-instance", "--state"])
        .arg(&s.state_file)
        .arg(&s.ec2[0])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.wait_until("A's renewal is refused", Duration::from_secs(10), |s| {
        calls(&s.w.instances[0].metrics(), "svid", "denied_instance") >= 1.0
    });
    // Within one SVID lifetime, B refuses A: its certificate lapsed, and the tunnel
    // made with it ended.
    s.wait_until("B refuses A", Duration::from_secs(10), |s| {
        s.call_orders(1).iter().all(|r| !r.ok)
    });
    // B is unaffected: its renewals keep succeeding.
    let b_issued = calls(&s.w.instances[1].metrics(), "svid", "issued");
    s.wait_until("B renews", Duration::from_secs(8), |s| {
        calls(&s.w.instances[1].metrics(), "svid", "issued") > b_issued
    });
    assert_eq!(
        calls(&s.w.instances[1].metrics(), "svid", "denied_instance"),
        0.0
    );
}

/// The two-phase anchor rotation with the issuer holding the issuing CA, under load:
/// stage (every bundle trusts old + new), activate (the issuer's CA is re-issued under the
/// new anchor; nodes' certificates turn over at half life), retire (checked against each
/// node's `/trust`). No request fails.
#[test]
fn anchor_rotation_through_the_issuer_under_load_fails_no_request() {
    let s = Issued::new(
        Lifetimes {
            svid_secs: 6,
            node_secs: 6,
            ca_secret: false,
        },
        None,
    );
    let ca = s.w.ca_dir().display().to_string();
    let distribute = || {
        // Out of band, as an operator's config management would.
        for i in 0..2 {
            let dir = s.w.instances[i].mesh.as_ref().unwrap().issuer_dir.clone();
            std::fs::copy(s.w.ca_dir().join("bundle.pem"), dir.join("bundle.pem")).unwrap();
        }
    };
    let anchors = |i: usize| -> Vec<String> {
        s.w.instances[i].trust()["anchors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let step = |step: &str| {
        let (a, b) = (s.w.instances[0].admin_url(), s.w.instances[1].admin_url());
        let out =
            s.w.ca_on(0, &[step, "--ca", &ca, "--node", &a, "--node", &b]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "ca {step}: {text}");
    };
    let first = anchors(0);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (call, stop) = (s.orders_caller(), stop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < deadline
            {
                for r in call(5) {
                    if r.ok { ok += 1 } else { failed.push(r) }
                }
            }
            (ok, failed)
        })
    };

    s.w.ca(&["rotate", "--ca", &ca]);
    distribute();
    s.wait_until(
        "both nodes trust both anchors",
        Duration::from_secs(15),
        |_| anchors(0).len() == 2 && anchors(1).len() == 2,
    );
    let new = anchors(0)[1].clone();
    step("activate");
    s.wait_until(
        "everything both nodes hold chains to the new anchor",
        Duration::from_secs(30),
        |s| (0..2).all(|i| s.w.instances[i].trust()["issuer"]["anchor"] == new.as_str()),
    );
    step("retire");
    distribute();
    s.wait_until(
        "both nodes trust only the new anchor",
        Duration::from_secs(15),
        |_| anchors(0) == [new.clone()] && anchors(1) == [new.clone()],
    );
    // Past one more SVID lifetime: tunnels made before are gone, new ones verify.
    std::thread::sleep(Duration::from_secs(7));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    eprintln!(
        "rotation under load: {ok} requests ok, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok >= 50, "load ran: {ok} requests");
    assert_ne!(first[0], new);
}
