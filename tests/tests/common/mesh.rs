//! A two-instance meshed world and probes of the tunnel port.
use std::{net::SocketAddr, path::PathBuf};

use harness::{NetworkMode::Host, ProxyOptions, World, metrics::counter, process};

use super::*;

pub const TRUST_DOMAIN: &str = "mesh.test";

/// The SNI a client sends to ask a node proxy for `identity`'s certificate
/// (mirrors `SpiffeId::sni`).
pub fn sni_for(identity: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, identity.as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{hex}.id.ecsmesh.internal")
}

/// Instance 0 runs a client task, instance 1 a server task (family `inst1-app0`) whose
/// endpoint 10.0.0.2:9000 is meshed.
pub struct Mesh {
    pub w: World,
    pub ep: SocketAddr,
    pub fam_a: String,
    pub fam_b: String,
}

pub fn mesh(opts_a: ProxyOptions, opts_b: ProxyOptions) -> Mesh {
    let mut w = World::new(tools(), 2);
    w.enable_mesh(TRUST_DOMAIN);
    mesh_in(w, opts_a, opts_b)
}

/// [`mesh`] in a two-instance world whose mesh (CA, issuers) is already enabled.
pub fn mesh_in(mut w: World, opts_a: ProxyOptions, opts_b: ProxyOptions) -> Mesh {
    w.add_task(0, Host, 1);
    w.add_task(1, Host, 1);
    let ep = w.instances[1].addr(9000);
    let (ep_b2, ep_a) = (w.instances[1].addr(9001), w.instances[0].addr(9000));
    w.instances[1].echo_server(&[ep, ep_b2]);
    w.instances[0].echo_server(&[ep_a]);
    let (fam_a, fam_b) = (
        w.instances[0].tasks[0].family.clone(),
        w.instances[1].tasks[0].family.clone(),
    );
    w.write_discovery(&[
        ("svc-b", ep, &fam_b),
        ("svc-a", w.instances[0].addr(9000), &fam_a),
    ]);
    w.instances[1].start_proxy(&opts_b);
    w.instances[0].start_proxy(&opts_a);
    Mesh {
        w,
        ep,
        fam_a,
        fam_b,
    }
}

/// Write a certificate made by `ecsmesh ca issue` and return (chain, key).
pub fn issue(w: &World, name: &str, args: &[&str]) -> (PathBuf, PathBuf) {
    let cert = w.workdir.join(format!("{name}.pem"));
    let key = w.workdir.join(format!("{name}.key"));
    let mut full: Vec<String> = vec!["issue".into()];
    full.extend(args.iter().map(|s| s.to_string()));
    full.extend([
        "--out-cert".into(),
        cert.display().to_string(),
        "--out-key".into(),
        key.display().to_string(),
    ]);
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    w.ca(&refs);
    (cert, key)
}

/// Probe instance 1's tunnel port from instance 0 with a given client certificate.
pub fn probe(m: &Mesh, cert: Option<&(PathBuf, PathBuf)>, target: SocketAddr) -> serde_json::Value {
    let b = &m.w.instances[1];
    let mut args: Vec<String> = vec![
        "tunnel".into(),
        "--connect".into(),
        SocketAddr::new(b.ipv4.into(), 15008).to_string(),
        "--sni".into(),
        sni_for(&m.w.identity(&m.fam_b)),
        "--target".into(),
        target.to_string(),
        "--payload-bytes".into(),
        "100".into(),
    ];
    if let Some((c, k)) = cert {
        args.extend([
            "--cert".into(),
            c.display().to_string(),
            "--key".into(),
            k.display().to_string(),
        ]);
    }
    let out = process::run(m.w.instances[0].unenrolled(&args));
    assert!(
        out.status.success(),
        "meshtool tunnel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("tunnel json")
}

/// The probe did not get a working stream, and instance 1 counted exactly this reason.
#[track_caller]
pub fn assert_rejected(m: &Mesh, probe: &serde_json::Value, reason: &str) {
    assert_ne!(probe["echo_ok"], true, "{probe}");
    let mb = m.w.instances[1].metrics();
    let n = counter(
        &mb,
        "ecsmesh_tunnel_rejected_total",
        &[("side", "server"), ("reason", reason)],
    );
    assert_eq!(
        n, 1.0,
        "rejection reason {reason} counted once; probe: {probe}"
    );
    // The proxy is still serving: a real task connection works afterwards.
    assert_redirected(
        &m.w.instances[0].tasks[0].client(&[m.ep], 1, 1000),
        m.w.instances[0].outbound_v4(Host),
    );
}

/// A client certificate instance 0's node proxy could have issued to its task: the
/// control that makes each rejection test mean something.
pub fn valid_client_cert(m: &Mesh) -> (PathBuf, PathBuf) {
    issued_by_a(m, "good", &m.w.identity(&m.fam_a))
}

/// A leaf for `uri` signed by instance 0's issuer (as its node proxy signs), named `name`.
pub fn issued_by_a(m: &Mesh, name: &str, uri: &str) -> (PathBuf, PathBuf) {
    let (ca, issuer) = (m.w.ca_dir().display().to_string(), issuer_a(m));
    issue(
        &m.w,
        name,
        &["--ca", &ca, "--issuer", &issuer, "--uri", uri],
    )
}

pub fn issuer_a(m: &Mesh) -> String {
    m.w.instances[0]
        .mesh
        .as_ref()
        .unwrap()
        .issuer_dir
        .display()
        .to_string()
}
