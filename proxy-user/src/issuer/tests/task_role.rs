//! `/v1/task`: task-role attestation, with requests signed by the sidecar's own signer and
//! a fake STS (the harness proves the signature check against moto with authentication).
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;

use super::{Fixture, STS_URL, TASK_ARN, csr_and_key, reason};
use crate::{
    identity::{
        protocol::{BINDING_HEADER, Reason, TaskAttestRequest, binding, issuer_id},
        remote::sign_get_caller_identity,
    },
    issuer::{Refused, service::Subject, sts},
};

const TEMPLATE: &str = "spiffe://{trust_domain}/ecs/{cluster}/{family}/{task_role}";
const SESSION: &str = "arn:aws:sts::123456789012:assumed-role/web-role/0123456789abcdef";

fn creds() -> Credentials {
    Credentials::new("ASIAEXAMPLE", "secret", Some("token".into()), None, "test")
}

/// A request as a sidecar makes it: bound to this issuer and `csr`, signed at `at`.
fn request(
    f: &Fixture,
    csr: &str,
    bound_csr: &str,
    url: &str,
    at: SystemTime,
) -> TaskAttestRequest {
    let bind = binding(&issuer_id(&f.td), bound_csr);
    TaskAttestRequest {
        task_arn: TASK_ARN.into(),
        csr: csr.to_owned(),
        sts: sign_get_caller_identity(&creds(), "eu-west-1", &url.parse().unwrap(), &bind, at)
            .unwrap(),
    }
}

async fn ask(f: &Fixture, req: TaskAttestRequest) -> Result<String, Refused> {
    f.service
        .task_svid(req, &mut Subject::default())
        .await
        .map(|i| i.spiffe_id)
}

#[tokio::test]
async fn a_task_with_its_own_role_session_gets_its_identity() {
    let f = Fixture::new(TEMPLATE);
    f.sts.caller(SESSION);
    let (csr, _) = csr_and_key();
    let req = request(&f, &csr, &csr, STS_URL, SystemTime::now());
    let id = ask(&f, req.clone()).await.unwrap();
    assert_eq!(id, "spiffe://mesh.test/ecs/prod/web/web-role");
    // STS got exactly what the task signed.
    let sent = f.sts.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].headers, req.sts.headers);
    let auth = &sent[0]
        .headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .unwrap()
        .1;
    assert!(auth.contains(BINDING_HEADER), "{auth}");
}

#[tokio::test]
async fn what_is_checked_before_sts_is_asked() {
    let f = Fixture::new(TEMPLATE);
    f.sts.caller(SESSION);
    let (csr, _) = csr_and_key();
    let (other, _) = csr_and_key();
    let now = SystemTime::now();
    // A captured request replayed with another key: bound to the first CSR.
    let replay = request(&f, &other, &csr, STS_URL, now);
    assert_eq!(reason(ask(&f, replay).await), Reason::BindingMismatch);
    // Signed for a server of the task's choosing.
    let elsewhere = request(&f, &csr, &csr, "https://evil.example", now);
    assert_eq!(
        reason(ask(&f, elsewhere).await),
        Reason::MalformedAttestation
    );
    // Old.
    let stale = request(&f, &csr, &csr, STS_URL, now - Duration::from_secs(3600));
    assert_eq!(reason(ask(&f, stale).await), Reason::MalformedAttestation);
    // The binding header not covered by the signature.
    let mut unsigned = request(&f, &csr, &csr, STS_URL, now);
    for (k, v) in &mut unsigned.sts.headers {
        if k == "authorization" {
            *v = v.replace(&format!(";{BINDING_HEADER}"), "");
        }
    }
    assert_eq!(
        reason(ask(&f, unsigned).await),
        Reason::MalformedAttestation
    );
    // Another STS action.
    let mut action = request(&f, &csr, &csr, STS_URL, now);
    action.sts.body = "Action=AssumeRole&Version=2011-06-15".into();
    assert_eq!(reason(ask(&f, action).await), Reason::MalformedAttestation);
    // An extra header would reach STS unsigned.
    let mut extra = request(&f, &csr, &csr, STS_URL, now);
    extra
        .sts
        .headers
        .push(("x-forwarded-for".into(), "1.2.3.4".into()));
    assert_eq!(reason(ask(&f, extra).await), Reason::MalformedAttestation);
    assert!(f.sts.sent.lock().unwrap().is_empty(), "STS was never asked");
}

#[tokio::test]
async fn what_sts_and_ecs_say_decides() {
    let f = Fixture::new(TEMPLATE);
    let (csr, _) = csr_and_key();
    let fresh = || request(&f, &csr, &csr, STS_URL, SystemTime::now());
    *f.sts.answer.lock().unwrap() = (
        403,
        "<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code></Error></ErrorResponse>".into(),
    );
    assert_eq!(reason(ask(&f, fresh()).await), Reason::ForgedAttestation);
    *f.sts.answer.lock().unwrap() = (503, String::new());
    assert_eq!(reason(ask(&f, fresh()).await), Reason::StsUnavailable);
    // Another task's session of the same role, an IAM user, another role.
    for (arn, want) in [
        (
            "arn:aws:sts::123456789012:assumed-role/web-role/ffffffffffffffff",
            Reason::NotTaskCredentials,
        ),
        (
            "arn:aws:iam::123456789012:user/alice",
            Reason::NotTaskCredentials,
        ),
        (
            "arn:aws:sts::123456789012:assumed-role/admin/0123456789abcdef",
            Reason::RoleMismatch,
        ),
        (
            "arn:aws:sts::999999999999:assumed-role/web-role/0123456789abcdef",
            Reason::RoleMismatch,
        ),
    ] {
        f.sts.caller(arn);
        assert_eq!(reason(ask(&f, fresh()).await), want, "{arn}");
    }
    f.sts.caller(SESSION);
    f.ecs.set_task(|t| t.last_status = "STOPPED".into());
    assert_eq!(reason(ask(&f, fresh()).await), Reason::TaskNotRunning);
    f.ecs.set_task(|t| t.last_status = "RUNNING".into());
    f.ecs.set_definition(|d| d.task_role_arn = None);
    assert_eq!(reason(ask(&f, fresh()).await), Reason::RoleMismatch);
}

#[test]
fn sts_answers_and_role_sessions_parse() {
    let s = sts::role_session(SESSION).unwrap();
    assert_eq!(
        (s.account.as_str(), s.role.as_str()),
        ("123456789012", "web-role")
    );
    assert_eq!(s.session, "0123456789abcdef");
    for bad in [
        "arn:aws:iam::123456789012:user/alice",
        "arn:aws:sts::123456789012:assumed-role/web-role",
        "arn:aws:sts::123456789012:assumed-role/a/b/c",
        "arn:aws:sts::123456789012:federated-user/bob",
    ] {
        assert!(sts::role_session(bad).is_none(), "{bad}");
    }
}
