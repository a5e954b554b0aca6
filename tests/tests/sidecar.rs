//! Sidecar mode: `ecsmesh sidecar` inside a bridge-mode task's netns, attached to that
//! task's cgroup only. The task's connections go through its own sidecar (loopback), over
//! mTLS to the server task's sidecar, and the node proxies never see them.
mod common;

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
