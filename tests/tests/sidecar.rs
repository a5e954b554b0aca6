//! Sidecar mode: `ecsmesh sidecar` inside a bridge-mode task's netns, attached to that
//! task's cgroup only. The task's connections go through its own sidecar (loopback), over
//! mTLS to the server task's sidecar, and the node proxies never see them.
mod common;
#[path = "common/issued.rs"]
mod issued;
#[path = "common/task_roles.rs"]
mod task_roles;

use common::{mesh::TRUST_DOMAIN, *};
use harness::{
    NetworkMode::Bridge,
    ProxyOptions, World,
    capture::{self, Capture},
    metrics::counter,
    world::{client_args, run_client},
};

const MARKER: &str = "ECSMESH-SIDECAR-PLAINTEXT-3c1e";

#[test]
fn bridge_task_traffic_goes_through_its_own_sidecar_over_mtls() {
    let mut w = World::new(tools(), 2);
    w.enable_mesh(TRUST_DOMAIN);
    let a = w.add_task(0, Bridge, 1);
    let b = w.add_task(1, Bridge, 1);
    let ep = w.instances[1].tasks[b].addr(9000);
    w.instances[1].tasks[b].server(0, &["echo".into(), ep.to_string()]);
    let (fam_a, fam_b) = (
        w.instances[0].tasks[a].family.clone(),
        w.instances[1].tasks[b].family.clone(),
    );
    let tunnel = w.instances[1].tasks[b].sidecar_tunnel_addr();
    w.write_discovery_with_tunnels(&[("svc-b", ep, &fam_b, Some(tunnel))]);
    // Node proxies run too, enrolling nothing: they must not be involved.
    let none = ProxyOptions {
        enrol: Some(vec![]),
        ..Default::default()
    };
    for i in 0..2 {
        w.instances[i].start_proxy(&none);
    }
    let opts = ProxyOptions {
        workers: Some(1),
        ..Default::default()
    };
    w.instances[1].start_sidecar(b, &opts);
    w.instances[0].start_sidecar(a, &opts);

    let cap = Capture::start(&w.fabric, "p0");
    let mut args = client_args(&[ep], 3, 32 * 1024);
    args.extend(["--marker".into(), MARKER.into()]);
    let reports = run_client(w.instances[0].tasks[a].meshtool(0, &args));
    let wire = cap.stop();
    // The task's socket peer is its sidecar's outbound listener on loopback, in its netns.
    assert_redirected(&reports, "127.0.0.1:15001".parse().unwrap());
    assert!(
        wire.len() > 3 * 32 * 1024,
        "the capture saw the tunnel ({} bytes)",
        wire.len()
    );
    assert!(
        !capture::contains(&wire, MARKER.as_bytes()),
        "plaintext marker leaked onto the wire"
    );

    let task_a = &w.instances[0].tasks[a];
    let ma = task_a.sidecar_metrics();
    assert_eq!(
        counter(
            &ma,
            "istio_tcp_connections_opened_total",
            &[("source_workload", task_a.family.as_str())]
        ),
        3.0,
        "client sidecar forwarded the three connections"
    );
    let (id_a, id_b) = (w.identity(&fam_a), w.identity(&fam_b));
    assert_eq!(
        counter(
            &ma,
            "ecsmesh_tls_handshakes_total",
            &[
                ("role", "client"),
                ("source_identity", id_a.as_str()),
                ("destination_identity", id_b.as_str())
            ]
        ),
        1.0,
        "one pooled mTLS connection to the server task's sidecar"
    );
    let mb = w.instances[1].tasks[b].sidecar_metrics();
    assert_eq!(
        counter(
            &mb,
            "ecsmesh_tunnel_inbound_streams_total",
            &[
                ("source_identity", id_a.as_str()),
                ("destination_family", fam_b.as_str())
            ]
        ),
        3.0,
        "the server task's sidecar terminated the three streams"
    );
    for i in 0..2 {
        let m = w.instances[i].metrics();
        assert_eq!(
            counter(&m, "istio_tcp_connections_opened_total", &[]),
            0.0,
            "node proxy of instance {i} was not involved"
        );
        assert_eq!(
            counter(&m, "ecsmesh_tunnel_inbound_streams_total", &[]),
            0.0
        );
    }

    // Stopping the sidecar removes its redirect: the task then connects directly.
    w.instances[0].stop_sidecar(a);
    assert_direct(&w.instances[0].tasks[a].client(&[ep], 1, 100));
}

/// An attacker's `POST /v1/task`: a GetCallerIdentity signed with `creds` (by this test's
/// own SigV4 signer), bound to this issuer and `bound_csr`, sent with `csr` for `task_arn`.
fn task_attestation(
    creds: &aws_credential_types::Credentials,
    task_arn: &str,
    csr: &str,
    bound_csr: &str,
) -> Vec<u8> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let digest = ring::digest::digest(&ring::digest::SHA256, bound_csr.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let binding = format!("spiffe://{TRUST_DOMAIN}/ecsmesh/issuer sha256={hex}");
    let body = "Action=GetCallerIdentity&Version=2011-06-15";
    let mut headers = vec![
        ("host".to_owned(), "127.0.0.1:5001".to_owned()),
        (
            "content-type".to_owned(),
            "application/x-www-form-urlencoded".to_owned(),
        ),
        ("x-ecsmesh-binding".to_owned(), binding),
    ];
    let identity = creds.clone().into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("sts")
        .time(std::time::SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let signable = SignableRequest::new(
        "POST",
        "http://127.0.0.1:5001/",
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(body.as_bytes()),
    )
    .unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    for (k, v) in instructions.headers() {
        headers.push((k.to_ascii_lowercase(), v.to_owned()));
    }
    serde_json::to_vec(&serde_json::json!({
        "task_arn": task_arn, "csr": csr,
        "sts": { "url": "http://127.0.0.1:5001/", "headers": headers, "body": body },
    }))
    .unwrap()
}

fn credentials(
    c: &harness::aws::RoleCredentials,
    secret: Option<&str>,
) -> aws_credential_types::Credentials {
    aws_credential_types::Credentials::new(
        &c.access_key_id,
        secret.unwrap_or(&c.secret_access_key),
        Some(c.session_token.clone()),
        None,
        "test",
    )
}

/// Issue 14 item 8 / issue 15 item 3: sidecars in ECS tasks learn their task from the task
/// metadata endpoint and prove it to the issuer with the task's own IAM role (STS checks
/// the signature: moto with authentication); no node proxy, no per-task file, no key
/// material handed to the task. Then what someone with a task's credentials cannot do.
#[test]
fn ecs_sidecars_prove_their_tasks_with_their_task_roles() {
    use harness::issuer::{CsrSpec, csr};
    use issued::{Issued, Lifetimes, identity};
    let mut s = Issued::world(
        Lifetimes {
            svid_secs: 3600,
            node_secs: 3600,
            ca_secret: false,
        },
        None,
    );
    let roles = s.enable_task_roles();
    s.start_issuer();
    let (client, orders) = (s.client.clone(), s.orders.clone());
    // A sidecar killed without SIGTERM left the pins of a task that is gone: the next
    // sidecar on the instance removes them.
    let stale = s.w.instances[1]
        .pin_dir
        .join("0b5e55ed0b5e55ed0b5e55ed0b5e55ed");
    std::fs::create_dir_all(&stale).unwrap();
    // Removed on failure too, so the instance's pin directory can be cleaned up.
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _stale_guard = RemoveDir(stale.clone());
    let mut orders_sidecar = s.start_sidecar(1, &orders, "orders-api", &roles.orders);
    assert!(!stale.exists(), "a gone task's pins are removed");
    let mut client_sidecar = s.start_sidecar(0, &client, "client-app", &roles.client);
    assert!(
        client_sidecar.pin_dir.is_dir() && orders_sidecar.pin_dir.is_dir(),
        "each sidecar pins under its own task's directory"
    );
    assert!(s.holds(0, &identity("client", "client-app")));
    assert!(s.holds(1, &identity("orders", "orders-api")));
    // The client's app container (a sibling of the sidecar's below the task's cgroup) is
    // redirected into its sidecar; the sidecar's own connections are not (or nothing
    // would leave the task).
    let reports = s.call_orders(3);
    assert_redirected(&reports, "127.0.0.1:15001".parse().unwrap());

    let issuer = s.issuer_addr(0);
    let post = |body: Vec<u8>| {
        let (status, text) = issuer.post("/v1/task", &body, None);
        (status, harness::issuer::IssuerAddr::reason(&text))
    };
    let (csr_a, _) = csr(CsrSpec::default());
    let (csr_b, _) = csr(CsrSpec::default());
    // The test's signer is right: the client's own session for the client's task.
    let own = credentials(&roles.client, None);
    assert_eq!(
        post(task_attestation(&own, &client.arn, &csr_a, &csr_a)).0,
        200,
        "a correctly signed request for the caller's own task is issued"
    );
    for (what, body, reason) in [
        (
            "the client's credentials asking for the orders task",
            task_attestation(&own, &orders.arn, &csr_a, &csr_a),
            "not_task_credentials",
        ),
        (
            "a signature made without the secret key",
            task_attestation(
                &credentials(&roles.client, Some("not-the-secret")),
                &client.arn,
                &csr_a,
                &csr_a,
            ),
            "forged_attestation",
        ),
        (
            "a session of the client's role named after the orders task",
            task_attestation(
                &credentials(&roles.client_role_as_orders, None),
                &orders.arn,
                &csr_a,
                &csr_a,
            ),
            "role_mismatch",
        ),
        (
            "a captured request sent with another key's CSR",
            task_attestation(&own, &client.arn, &csr_b, &csr_a),
            "binding_mismatch",
        ),
    ] {
        let (status, got) = post(body);
        assert_eq!((status, got.as_str()), (403, reason), "{what}");
    }
    let m = s.issuer_metrics();
    let count = |result: &str| {
        counter(
            &m,
            "ecsmesh_issuer_requests_total",
            &[("endpoint", "task"), ("result", result)],
        )
    };
    for reason in [
        "not_task_credentials",
        "forged_attestation",
        "role_mismatch",
        "binding_mismatch",
    ] {
        assert_eq!(count(reason), 1.0, "{reason} counted once");
    }
    assert!(count("issued") >= 3.0, "both sidecars and the test's own");
    assert_eq!(
        counter(
            &m,
            "ecsmesh_issuer_requests_total",
            &[("endpoint", "attest")]
        ),
        0.0,
        "no node attested: the sidecars needed none"
    );

    // The task stops (its sidecar last): the sidecar takes its programs and pins along.
    for sc in [&mut client_sidecar, &mut orders_sidecar] {
        let st = sc.stop().expect("the sidecar exits on SIGTERM");
        let log = std::fs::read_to_string(&sc.log).unwrap_or_default();
        assert!(st.success(), "{st}: {log}");
        assert!(
            !sc.pin_dir.exists(),
            "{} removed: {log}",
            sc.pin_dir.display()
        );
        assert!(
            harness::cgroup_prog_ids(&sc.task_cgroup).is_empty(),
            "nothing left attached to the task's cgroup"
        );
    }
}
