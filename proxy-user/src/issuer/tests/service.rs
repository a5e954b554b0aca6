//! The issuing decisions, refusal by refusal.
use std::sync::atomic::Ordering;

use rustls_pki_types::UnixTime;

use super::*;
use crate::identity::{
    DEFAULT_TEMPLATE, LeafSpec, SpiffeId, Usage,
    protocol::{NodeRenewRequest, node_id},
    verify_peer,
};

#[tokio::test]
async fn attestation_issues_a_node_certificate_that_verifies_against_the_bundle() {
    let f = Fixture::new(DEFAULT_TEMPLATE);
    let (issued, _key) = f.attest().await.unwrap();
    let expected = node_id(&f.td, INSTANCE).unwrap();
    assert_eq!(issued.spiffe_id, expected.to_string());
    let chain = certs(&issued.chain);
    assert_eq!(chain.len(), 2, "leaf, then the issuing CA");
    let id = verify_peer(
        &f.authority.bundle(),
        std::slice::from_ref(&f.td),
        &chain[0],
        &chain[1..],
        UnixTime::now(),
        Usage::Client,
    )
    .unwrap();
    assert_eq!(id, expected);
    let state = f.service.state.read().unwrap();
    assert_eq!(state.instances[INSTANCE].container_instance_arn, CI_ARN);
}

#[tokio::test]
async fn a_second_attestation_is_a_replay_until_the_node_certificate_expires() {
    let f = Fixture::new(DEFAULT_TEMPLATE);
    f.attest().await.unwrap();
    assert_eq!(reason(f.attest().await), Reason::ReplayedAttestation);
    // The recorded node certificate has expired: attesting is allowed again.
    let text = std::fs::read_to_string(f.state_path()).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let now = super::super::state::unix_secs(std::time::SystemTime::now());
    state["instances"][INSTANCE]["node_cert_not_after"] = (now - 1).into();
    std::fs::write(f.state_path(), state.to_string()).unwrap();
    f.attest().await.unwrap();
}

#[tokio::test]
async fn forged_documents_are_refused() {
    let f = Fixture::new(DEFAULT_TEMPLATE);
    let attest = |document: String, signature: String| {
        let req = AttestRequest {
            document,
            signature,
            csr: csr_and_key().0,
        };
        async { f.service.attest(req, &mut Subject::default()).await }
    };
    let doc = document(INSTANCE);
    // Changed after signing (another instance id in the signed document's place).
    let changed = doc.replace("eu-west-1a", "eu-west-1b");
    assert_eq!(
        reason(attest(changed, sign(&doc)).await),
        Reason::ForgedAttestation
    );
    // Signed by a key that is not AWS's.
    assert_eq!(
        reason(attest(doc.clone(), forger_sign(&doc)).await),
        Reason::ForgedAttestation
    );
    assert_eq!(
        reason(attest(doc.clone(), "!!not base64!!".into()).await),
        Reason::ForgedAttestation
    );
    // The genuine signature, with the line breaks IMDS puts in it, passes.
    let sig = sign(&doc);
    let wrapped = sig
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    attest(doc, wrapped).await.unwrap();
}

#[tokio::test]
async fn malformed_documents_are_refused_even_when_signed() {
    let f = Fixture::new(DEFAULT_TEMPLATE);
    for doc in [
        "not json".to_owned(),
        r#"{"instanceId":"i-0123456789abcdef0","region":"eu-west-1"}"#.to_owned(),
        document("i-../../etc"),
        document("i-0123456789ABCDEF0"),
    ] {
        let req = attest_request(&doc, csr_and_key().0);
        let r = f.service.attest(req, &mut Subject::default()).await;
        assert_eq!(reason(r), Reason::MalformedAttestation, "{doc}");
    }
}

#[tokio::test]
async fn instances_outside_the_cluster_are_refused() {
    let f = Fixture::new(DEFAULT_TEMPLATE);
    let other = "i-0fedcba9876543210";
    let req = attest_request(&document(other), csr_and_key().0);
    let r = f.service.attest(req, &mut Subject::default()).await;
    assert_eq!(reason(r), Reason::NotInCluster);
    f.ecs
        .instances
        .lock()
        .unwrap()
        .get_mut(INSTANCE)
        .unwrap()
        .status = "INACTIVE".into();
    assert_eq!(reason(f.attest().await), Reason::NotInCluster);
    f.ecs
        .instances
        .lock()
        .unwrap()
        .get_mut(INSTANCE)
        .unwrap()
        .status = "DRAINING".into();
    f.attest().await.unwrap();
}

#[tokio::test]
async fn denied_instances_get_nothing_new() {
    // From the config.
    let f = Fixture::with_denied(DEFAULT_TEMPLATE, &[INSTANCE]);
    assert_eq!(reason(f.attest().await), Reason::DeniedInstance);

    // From the state file, after the node got its certificates: attestation (once the
    // node certificate expired), renewal and SVIDs are all refused.
    let f = Fixture::new(DEFAULT_TEMPLATE);
    let node = f.node_chain().await;
    f.svid(&node).await.unwrap();
    super::super::state::set_denied(&f.state_path(), INSTANCE, true).unwrap();
    assert_eq!(reason(f.svid(&node).await), Reason::DeniedInstance);
    let renew = NodeRenewRequest {
        csr: csr_and_key().0,
    };
    let r = f
        .service
        .renew_node(Some(&node), renew, &mut Subject::default())
        .await;
    assert_eq!(reason(r), Reason::DeniedInstance);
    let _ = std::fs::remove_file(f.state_path());
    super::super::state::set_denied(&f.state_path(), INSTANCE, true).unwrap();
    assert_eq!(reason(f.attest().await), Reason::DeniedInstance);
    // Allowed again.
    super::super::state::set_denied(&f.state_path(), INSTANCE, false).unwrap();
    f.attest().await.unwrap();
}

#[tokio::test]
async fn a_node_certificate_renews_without_attestation() {
    let f = Fixture::new(DEFAULT_TEMPLATE);
    let node = f.node_chain().await;
    let renew = NodeRenewRequest {
        csr: csr_and_key().0,
    };
    let issued = f
        .service
        .renew_node(Some(&node), renew.clone(), &mut Subject::default())
        .await
        .unwrap();
    assert_eq!(
        issued.spiffe_id,
        node_id(&f.td, INSTANCE).unwrap().to_string()
    );
    // Not a container instance any more: no renewal.
    f.ecs.instances.lock().unwrap().clear();
    let r = f
        .service
        .renew_node(Some(&node), renew, &mut Subject::default())
        .await;
    assert_eq!(reason(r), Reason::NotInCluster);
}

#[tokio::test]
async fn svids_are_named_from_what_ecs_says() {
    let f = Fixture::new("spiffe://{trust_domain}/ecs/{cluster}/{service}/{task_role}");
    let node = f.node_chain().await;
    let issued = f.svid(&node).await.unwrap();
    // Role name: after the last '/' of the role ARN (paths are dropped).
    assert_eq!(
        issued.spiffe_id,
        "spiffe://mesh.test/ecs/prod/frontend/web-role"
    );
    let chain = certs(&issued.chain);
    let id = verify_peer(
        &f.authority.bundle(),
        std::slice::from_ref(&f.td),
        &chain[0],
        &chain[1..],
        UnixTime::now(),
        Usage::Client,
    )
    .unwrap();
    assert_eq!(id.to_string(), issued.spiffe_id);

    // Not in a service: {service} cannot be rendered.
    f.ecs.set_task(|t| t.group = Some("family:web".into()));
    assert_eq!(reason(f.svid(&node).await), Reason::NoIdentity);
    // No task role: {task_role} cannot be rendered.
    f.ecs
        .set_task(|t| t.group = Some("service:frontend".into()));
    f.ecs.set_definition(|d| d.task_role_arn = None);
    assert_eq!(reason(f.svid(&node).await), Reason::NoIdentity);
}

#[tokio::test]
async fn svids_only_for_running_tasks_of_the_nodes_own_instance() {
    let f = Fixture::new(DEFAULT_TEMPLATE);
    let node = f.node_chain().await;
    assert_eq!(
        f.svid(&node).await.unwrap().spiffe_id,
        "spiffe://mesh.test/ecs/prod/web"
    );
    f.ecs
        .set_task(|t| t.container_instance_arn = Some(OTHER_CI_ARN.into()));
    assert_eq!(reason(f.svid(&node).await), Reason::NotOnInstance);
    f.ecs.set_task(|t| t.container_instance_arn = None);
    assert_eq!(reason(f.svid(&node).await), Reason::NotOnInstance);
    f.ecs.set_task(|t| {
        t.container_instance_arn = Some(CI_ARN.into());
        t.last_status = "STOPPED".into();
    });
    assert_eq!(reason(f.svid(&node).await), Reason::TaskNotRunning);
    f.ecs.set_task(|t| t.last_status = "DEACTIVATING".into());
    f.svid(&node).await.unwrap();
    f.ecs.tasks.lock().unwrap().clear();
    assert_eq!(reason(f.svid(&node).await), Reason::UnknownTask);
    let req = SvidRequest {
        task_arn: "../../etc/passwd".into(),
        csr: csr_and_key().0,
    };
    let r = f
        .service
        .svid(Some(&node), req, &mut Subject::default())
        .await;
    assert_eq!(reason(r), Reason::UnknownTask);
    f.ecs.down.store(true, Ordering::Relaxed);
    let r = f.svid(&node).await;
    assert_eq!(reason(r), Reason::EcsUnavailable);
    assert_eq!(Reason::EcsUnavailable.status(), 503);
}

#[tokio::test]
async fn only_valid_node_certificates_of_our_trust_domain_may_ask() {
    let f = Fixture::new(DEFAULT_TEMPLATE);
    let r = f
        .service
        .svid(None, svid_req(), &mut Subject::default())
        .await;
    assert_eq!(reason(r), Reason::NoNodeCertificate);
    let r = f
        .service
        .svid(Some(&[]), svid_req(), &mut Subject::default())
        .await;
    assert_eq!(reason(r), Reason::NoNodeCertificate);

    // A workload SVID of our CA is not a node certificate.
    let workload = f
        .authority
        .issuer()
        .issue_svid(&id("spiffe://mesh.test/ecs/prod/web"), HOUR);
    let r = f.svid(&workload.unwrap().chain).await;
    assert_eq!(reason(r), Reason::NotANodeCertificate);

    // A node-shaped certificate that does not chain to the bundle.
    let (pem, _) =
        f.ca.issue_leaf(&LeafSpec {
            uris: vec![format!("spiffe://mesh.test/ecsmesh/node/{INSTANCE}")],
            self_signed: true,
            ..LeafSpec::default()
        })
        .unwrap();
    assert_eq!(
        reason(f.svid(&certs(&pem)).await),
        Reason::BadNodeCertificate
    );
    // Expired.
    let expired =
        f.ca.issue_leaf(&LeafSpec {
            uris: vec![format!("spiffe://mesh.test/ecsmesh/node/{INSTANCE}")],
            lifetime: std::time::Duration::from_secs(10),
            not_before_ago: std::time::Duration::from_secs(60),
            issuer_dir: Some(f.tmp.path().join("issuer")),
            ..LeafSpec::default()
        })
        .unwrap()
        .0;
    assert_eq!(
        reason(f.svid(&certs(&expired)).await),
        Reason::BadNodeCertificate
    );
}

fn svid_req() -> SvidRequest {
    SvidRequest {
        task_arn: TASK_ARN.into(),
        csr: csr_and_key().0,
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

#[tokio::test]
async fn a_reload_with_a_ca_that_does_not_fit_keeps_the_last_good_one() {
    let mut f = Fixture::new(DEFAULT_TEMPLATE);
    let before = f.authority.issuer().certificate().clone();
    // An issuing CA of another trust domain.
    let other = TempDir::new("reload");
    let mut ca = Ca::init(
        &other.path().join("ca"),
        TrustDomain::new("other.test").unwrap(),
    )
    .unwrap();
    ca.issue_intermediate("issuer", &other.path().join("issuer"))
        .unwrap();
    let foreign = Issuer::load(&other.path().join("issuer")).unwrap();
    assert!(
        f.authority
            .replace(foreign, (*f.authority.bundle()).clone())
            .is_err()
    );
    // Our trust domain, but a CA the bundle does not anchor.
    let mut ca2 = Ca::init(&other.path().join("ca2"), f.td.clone()).unwrap();
    ca2.issue_intermediate("issuer", &other.path().join("issuer2"))
        .unwrap();
    let unanchored = Issuer::load(&other.path().join("issuer2")).unwrap();
    assert!(
        f.authority
            .replace(unanchored, (*f.authority.bundle()).clone())
            .is_err()
    );
    assert_eq!(f.authority.issuer().certificate(), &before);
    // A re-issued CA of the same anchor is taken.
    let dir = f.tmp.path().join("issuer");
    f.ca.issue_intermediate("issuer", &dir).unwrap();
    let bundle = (*f.authority.bundle()).clone();
    f.authority
        .replace(Issuer::load(&dir).unwrap(), bundle)
        .unwrap();
    assert_ne!(f.authority.issuer().certificate(), &before);
}
