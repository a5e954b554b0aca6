//! Tests of the issuer with a fake ECS, a CA in a scratch directory, and a fixture RSA key
//! standing in for AWS's instance identity signer (`testdata/`).
mod csr;
mod service;
mod task_role;
mod tls;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use base64::Engine;
use rustls_pki_types::CertificateDer;

use super::{
    Refused,
    attest::IidVerifier,
    ca_source::Authority,
    ecs::{ContainerInstance, EcsError, EcsView, Task, TaskDefinition},
    service::{Service, Subject},
    state::StateFile,
    sts::Sts,
};
use crate::identity::{
    Ca, IdentityTemplate, Issuer, TrustBundle, TrustDomain,
    protocol::{AttestRequest, Issued, Reason, SignedStsRequest, SvidRequest},
};

pub(super) const INSTANCE: &str = "i-0123456789abcdef0";
pub(super) const CI_ARN: &str =
    "arn:aws:ecs:eu-west-1:123456789012:container-instance/prod/4c6423e55ad54af697fb33ed3b5f535c";
pub(super) const OTHER_CI_ARN: &str =
    "arn:aws:ecs:eu-west-1:123456789012:container-instance/prod/99999999999999999999999999999999";
pub(super) const TASK_ARN: &str = "arn:aws:ecs:eu-west-1:123456789012:task/prod/0123456789abcdef";
pub(super) const TD_ARN: &str = "arn:aws:ecs:eu-west-1:123456789012:task-definition/web:3";
const IID_CERT: &str = include_str!("testdata/iid.pem");
const IID_KEY: &[u8] = include_bytes!("testdata/iid.pk8");
const OTHER_KEY: &[u8] = include_bytes!("testdata/other.pk8");
const HOUR: Duration = Duration::from_secs(3600);

pub(super) use crate::identity::tests::TempDir;

/// ECS as the tests want it.
#[derive(Default)]
pub(super) struct FakeEcs {
    pub instances: Mutex<HashMap<String, ContainerInstance>>,
    pub tasks: Mutex<HashMap<String, Task>>,
    pub definitions: Mutex<HashMap<String, TaskDefinition>>,
    pub down: AtomicBool,
}

impl FakeEcs {
    fn check(&self, operation: &'static str) -> Result<(), EcsError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(EcsError {
                operation,
                message: "connection refused".into(),
            });
        }
        Ok(())
    }

    pub(super) fn set_task(&self, f: impl FnOnce(&mut Task)) {
        let mut tasks = self.tasks.lock().unwrap();
        f(tasks.get_mut(TASK_ARN).unwrap());
    }

    pub(super) fn set_definition(&self, f: impl FnOnce(&mut TaskDefinition)) {
        let mut defs = self.definitions.lock().unwrap();
        f(defs.get_mut(TD_ARN).unwrap());
    }
}

#[async_trait]
impl EcsView for FakeEcs {
    async fn container_instance(&self, ec2: &str) -> Result<Option<ContainerInstance>, EcsError> {
        self.check("ListContainerInstances")?;
        Ok(self.instances.lock().unwrap().get(ec2).cloned())
    }

    async fn task(&self, arn: &str) -> Result<Option<Task>, EcsError> {
        self.check("DescribeTasks")?;
        Ok(self.tasks.lock().unwrap().get(arn).cloned())
    }

    async fn task_definition(&self, arn: &str) -> Result<Option<TaskDefinition>, EcsError> {
        self.check("DescribeTaskDefinition")?;
        Ok(self.definitions.lock().unwrap().get(arn).cloned())
    }
}

/// The STS endpoint of the fixture.
pub(super) const STS_URL: &str = "https://sts.eu-west-1.amazonaws.com";

/// STS as the tests want it: one canned answer; records what it was sent.
pub(super) struct FakeSts {
    pub answer: Mutex<(u16, String)>,
    pub sent: Mutex<Vec<SignedStsRequest>>,
}

impl FakeSts {
    pub(super) fn caller(&self, arn: &str) {
        *self.answer.lock().unwrap() = (
            200,
            format!(
                "<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>{arn}</Arn>\
                 <UserId>AROA:x</UserId><Account>123456789012</Account>\
                 </GetCallerIdentityResult></GetCallerIdentityResponse>"
            ),
        );
    }
}

#[async_trait]
impl Sts for FakeSts {
    async fn send(&self, req: &SignedStsRequest) -> Result<(u16, String), String> {
        self.sent.lock().unwrap().push(req.clone());
        Ok(self.answer.lock().unwrap().clone())
    }
}

/// A CA with an issuing CA `issuer`, a service on top of it, and one container instance
/// running one task of family `web` in service `frontend`.
pub(super) struct Fixture {
    pub tmp: TempDir,
    pub ca: Ca,
    pub td: TrustDomain,
    pub ecs: Arc<FakeEcs>,
    pub service: Service,
    pub authority: Arc<Authority>,
    pub sts: Arc<FakeSts>,
}

impl Fixture {
    pub(super) fn new(template: &str) -> Self {
        Self::with_denied(template, &[])
    }

    pub(super) fn with_denied(template: &str, denied: &[&str]) -> Self {
        let tmp = TempDir::new("svc");
        let td = TrustDomain::new("mesh.test").unwrap();
        let mut ca = Ca::init(&tmp.path().join("ca"), td.clone()).unwrap();
        let issuer_dir = tmp.path().join("issuer");
        ca.issue_intermediate("issuer", &issuer_dir).unwrap();
        let authority = Arc::new(
            Authority::new(
                td.clone(),
                Issuer::load(&issuer_dir).unwrap(),
                TrustBundle::load(&issuer_dir.join("bundle.pem")).unwrap(),
                HOUR,
            )
            .unwrap(),
        );
        let ecs = Arc::new(FakeEcs::default());
        ecs.instances.lock().unwrap().insert(
            INSTANCE.into(),
            ContainerInstance {
                arn: CI_ARN.into(),
                status: "ACTIVE".into(),
            },
        );
        ecs.tasks.lock().unwrap().insert(
            TASK_ARN.into(),
            Task {
                arn: TASK_ARN.into(),
                container_instance_arn: Some(CI_ARN.into()),
                last_status: "RUNNING".into(),
                task_definition_arn: TD_ARN.into(),
                group: Some("service:frontend".into()),
            },
        );
        ecs.definitions.lock().unwrap().insert(
            TD_ARN.into(),
            TaskDefinition {
                family: "web".into(),
                task_role_arn: Some("arn:aws:iam::123456789012:role/app/web-role".into()),
            },
        );
        let sts = Arc::new(FakeSts {
            answer: Mutex::new((500, String::new())),
            sent: Mutex::new(Vec::new()),
        });
        let service = Service {
            td: td.clone(),
            cluster: "prod".into(),
            template: IdentityTemplate::new(template).unwrap(),
            svid_lifetime: HOUR,
            node_lifetime: HOUR,
            authority: authority.clone(),
            iid: IidVerifier::from_pem(IID_CERT).unwrap(),
            state: StateFile::new(tmp.path().join("state.json")),
            denied: denied.iter().map(|s| s.to_string()).collect::<HashSet<_>>(),
            ecs: ecs.clone(),
            sts: Some((STS_URL.parse().unwrap(), sts.clone() as Arc<dyn Sts>)),
        };
        Self {
            tmp,
            ca,
            td,
            ecs,
            service,
            authority,
            sts,
        }
    }

    pub(super) fn state_path(&self) -> PathBuf {
        self.tmp.path().join("state.json")
    }

    /// Attests `INSTANCE`; returns the node certificate chain and its key.
    pub(super) async fn attest(&self) -> Result<(Issued, rcgen::KeyPair), Refused> {
        let (csr, key) = csr_and_key();
        self.service
            .attest(
                attest_request(&document(INSTANCE), csr),
                &mut Subject::default(),
            )
            .await
            .map(|i| (i, key))
    }

    /// The node certificate chain of `INSTANCE` (after a successful attestation).
    pub(super) async fn node_chain(&self) -> Vec<CertificateDer<'static>> {
        certs(&self.attest().await.unwrap().0.chain)
    }

    pub(super) async fn svid(&self, node: &[CertificateDer<'static>]) -> Result<Issued, Refused> {
        let req = SvidRequest {
            task_arn: TASK_ARN.into(),
            csr: csr_and_key().0,
        };
        self.service
            .svid(Some(node), req, &mut Subject::default())
            .await
    }
}

pub(super) fn document(instance: &str) -> String {
    format!(
        r#"{{"accountId":"123456789012","architecture":"x86_64","availabilityZone":"eu-west-1a","imageId":"ami-0123","instanceId":"{instance}","instanceType":"m5.large","pendingTime":"2024-01-01T00:00:00Z","privateIp":"10.0.0.1","region":"eu-west-1","version":"2017-09-30"}}"#
    )
}

/// Base64 PKCS#1 v1.5 SHA-256 signature of `doc` by a PKCS#8 RSA key.
pub(super) fn sign_with(pkcs8: &[u8], doc: &str) -> String {
    let key = ring::signature::RsaKeyPair::from_pkcs8(pkcs8).unwrap();
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        doc.as_bytes(),
        &mut sig,
    )
    .unwrap();
    base64::engine::general_purpose::STANDARD.encode(sig)
}

pub(super) fn sign(doc: &str) -> String {
    sign_with(IID_KEY, doc)
}

pub(super) fn forger_sign(doc: &str) -> String {
    sign_with(OTHER_KEY, doc)
}

pub(super) fn attest_request(doc: &str, csr: String) -> AttestRequest {
    AttestRequest {
        document: doc.to_owned(),
        signature: sign(doc),
        csr,
    }
}

/// A P-256 key and a plain CSR for it.
pub(super) fn csr_and_key() -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = csr_with(&key, rcgen::CertificateParams::default());
    (csr, key)
}

pub(super) fn csr_with(key: &rcgen::KeyPair, params: rcgen::CertificateParams) -> String {
    params.serialize_request(key).unwrap().pem().unwrap()
}

pub(super) fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

pub(super) fn reason<T: std::fmt::Debug>(r: Result<T, Refused>) -> Reason {
    r.expect_err("expected a refusal").reason
}
