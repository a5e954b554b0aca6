use clap::Parser;

use super::{TempDir, certs, check_with, mode};
use crate::{
    ca_cli::{CaCommand, run},
    identity::{Rejection, TrustBundle, TrustDomain},
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: CaCommand,
}

fn try_ca(args: &[&str]) -> Result<(), String> {
    let cli = Cli::try_parse_from(std::iter::once("ca").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    run(cli.cmd).map_err(|e| e.to_string())
}

fn ca(args: &[&str]) {
    try_ca(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
}

/// `ca init` into `<tmp>/ca` and `ca issue-intermediate` for `instance` into `<tmp>/node`.
fn ca_with_one_node(tmp: &TempDir, instance: &str) {
    let p = |s: &str| tmp.path().join(s).to_str().unwrap().to_owned();
    ca(&["init", "--trust-domain", "example.org", "--out", &p("ca")]);
    ca(&[
        "issue-intermediate",
        "--ca",
        &p("ca"),
        "--instance",
        instance,
        "--out",
        &p("node"),
    ]);
}

#[test]
fn cli_drives_the_whole_ca_lifecycle() {
    let tmp = TempDir::new("cli");
    let p = |s: &str| tmp.path().join(s).to_str().unwrap().to_owned();
    ca_with_one_node(&tmp, "i-7");
    ca(&[
        "issue",
        "--ca",
        &p("ca"),
        "--issuer",
        &p("node"),
        "--uri",
        "spiffe://example.org/ecs/prod/orders",
        "--out-cert",
        &p("leaf.pem"),
        "--out-key",
        &p("leaf.key"),
    ]);
    assert_eq!(mode(&tmp.path().join("leaf.key")), 0o600);
    assert_eq!(mode(&tmp.path().join("node/issuer.key")), 0o600);
    let td = [TrustDomain::new("example.org").unwrap()];
    let bundle = || TrustBundle::load(&tmp.path().join("node/bundle.pem")).unwrap();
    let leaf = certs(&std::fs::read_to_string(tmp.path().join("leaf.pem")).unwrap());
    assert_eq!(leaf.len(), 2);
    assert!(check_with(&bundle(), &td, &leaf).is_ok());

    // Expired, two URIs, self-signed: every flag reaches the certificate.
    ca(&[
        "issue",
        "--ca",
        &p("ca"),
        "--issuer",
        &p("node"),
        "--uri",
        "spiffe://example.org/a",
        "--uri",
        "spiffe://example.org/b",
        "--out-cert",
        &p("two.pem"),
        "--out-key",
        &p("two.key"),
    ]);
    let two = certs(&std::fs::read_to_string(tmp.path().join("two.pem")).unwrap());
    assert_eq!(
        check_with(&bundle(), &td, &two),
        Err(Rejection::MultipleUriSans(2))
    );
    ca(&[
        "issue",
        "--ca",
        &p("ca"),
        "--issuer",
        &p("node"),
        "--uri",
        "spiffe://example.org/a",
        "--lifetime-secs",
        "10",
        "--not-before-secs-ago",
        "60",
        "--out-cert",
        &p("old.pem"),
        "--out-key",
        &p("old.key"),
    ]);
    let old = certs(&std::fs::read_to_string(tmp.path().join("old.pem")).unwrap());
    assert_eq!(check_with(&bundle(), &td, &old), Err(Rejection::Expired));
    ca(&[
        "issue",
        "--ca",
        &p("ca"),
        "--self-signed",
        "--uri",
        "spiffe://example.org/a",
        "--out-cert",
        &p("self.pem"),
        "--out-key",
        &p("self.key"),
    ]);
    let selfsigned = certs(&std::fs::read_to_string(tmp.path().join("self.pem")).unwrap());
    assert!(matches!(
        check_with(&bundle(), &td, &selfsigned),
        Err(Rejection::UnknownCa(_))
    ));

    ca(&["rotate", "--ca", &p("ca")]);
    assert_eq!(bundle().len(), 2);
    assert!(check_with(&bundle(), &td, &leaf).is_ok());
    // Without --node, activation waits for the default minimum after staging.
    let err = try_ca(&["activate", "--ca", &p("ca")]).unwrap_err();
    assert!(err.contains("less than the minimum of 300 s"), "{err}");
    ca(&["activate", "--ca", &p("ca"), "--min-staged-secs", "0"]);
    ca(&["retire", "--ca", &p("ca")]);
    assert_eq!(bundle().len(), 1);
    assert!(matches!(
        check_with(&bundle(), &td, &leaf),
        Err(Rejection::UnknownCa(_))
    ));
}

#[test]
fn cli_init_refuses_a_bad_trust_domain_and_an_existing_ca() {
    let tmp = TempDir::new("cli-init");
    let out = tmp.path().join("ca");
    let cmd = |td: &str| CaCommand::Init {
        trust_domain: td.into(),
        out: out.clone(),
    };
    assert!(run(cmd("Not A Domain")).is_err());
    run(cmd("example.org")).unwrap();
    assert!(run(cmd("example.org")).is_err());
}

/// The node checks of `activate` and `retire` against a real admin endpoint serving a real
/// identity manager, which reloads only when the test says so: a node that has not picked
/// up the new bundle (or issuer) holds the next step back.
#[test]
fn activate_and_retire_wait_for_every_node() {
    use std::sync::Arc;

    use crate::{
        admin::{AdminState, serve},
        identity::{IdentityConfig, IdentityManager},
        metrics::Metrics,
    };
    let tmp = TempDir::new("cli-nodes");
    let p = |s: &str| tmp.path().join(s).to_str().unwrap().to_owned();
    ca_with_one_node(&tmp, "i-1");
    let node = tmp.path().join("node");
    let manager = IdentityManager::new(IdentityConfig {
        bundle: node.join("bundle.pem"),
        source: crate::identity::manager::SvidSource::IssuerDir(node.clone()),
        svid_lifetime: std::time::Duration::from_secs(3600),
        allowed_trust_domains: Vec::new(),
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = Arc::new(AdminState {
        ready: Default::default(),
        metrics: Arc::new(Metrics::default()),
        identities: Some(manager.clone()),
        discovery: None,
        mesh: None,
        tasks: None,
        config_dump: "{}".into(),
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    rt.spawn(serve(
        listener,
        crate::admin::Caller::Network,
        state,
        shutdown.clone(),
    ));

    ca(&["rotate", "--ca", &p("ca")]);
    let activate = ["activate", "--ca", &p("ca"), "--node", &url];
    let err = try_ca(&activate).unwrap_err();
    assert!(err.contains("does not trust anchor"), "{err}");
    manager.reload().unwrap();
    ca(&activate);

    let retire = ["retire", "--ca", &p("ca"), "--node", &url];
    let err = try_ca(&retire).unwrap_err();
    assert!(err.contains("still signs under anchor"), "{err}");
    assert_eq!(manager.trust_status().anchors.len(), 2);
    manager.reload().unwrap();
    ca(&retire);
    manager.reload().unwrap();
    assert_eq!(manager.trust_status().anchors.len(), 1);

    // An unreachable node holds a step back too; --force goes ahead.
    shutdown.cancel();
    drop(rt);
    ca(&["rotate", "--ca", &p("ca")]);
    let err = try_ca(&activate).unwrap_err();
    assert!(err.contains("did not answer"), "{err}");
    ca(&["activate", "--ca", &p("ca"), "--node", &url, "--force"]);
}
