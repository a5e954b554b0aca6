//! AWS stand-ins for the harness: moto (the AWS API emulator from the project's venv) in an
//! instance's netns, ECS agent task documents shaped like the real agent's, and an IMDS
//! fixture serving a signed instance identity document.
//!
//! The instance identity documents are signed with a test-only RSA key
//! (`proxy-user/tests/fixtures/iid/`): it stands in for AWS's per-region certificate, the
//! way SPIRE's aws_iid tests do. It is not an AWS key.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    World,
    fixture::HttpFixture,
    netns::Netns,
    process::{self, Placement, Proc},
};

pub const MOTO_PORT: u16 = 5000;

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(format!("{}/../{rel}", env!("CARGO_MANIFEST_DIR")))
}

/// moto listening on 0.0.0.0:5000 in one instance's netns; killed on drop.
pub struct Moto {
    pub proc: Proc,
    netns: PathBuf,
    port: u16,
}

/// A second moto for STS with request authentication on (moto checks SigV4 signatures
/// only then): the first `unauthenticated` requests set it up, every later one must be
/// signed with credentials it issued.
pub const STS_MOTO_PORT: u16 = 5001;

impl Moto {
    pub fn start(w: &World, inst: usize) -> Moto {
        Self::start_at(w, inst, MOTO_PORT, None)
    }

    pub fn start_authenticated(w: &World, inst: usize, unauthenticated: usize) -> Moto {
        Self::start_at(w, inst, STS_MOTO_PORT, Some(unauthenticated))
    }

    fn start_at(w: &World, inst: usize, port: u16, auth_after: Option<usize>) -> Moto {
        let bin = repo_path("target/pyenv/bin/moto_server");
        assert!(
            bin.exists(),
            "{}: run `cargo xtask deploy-check` first (creates target/pyenv)",
            bin.display()
        );
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["-H", "0.0.0.0", "-p", &port.to_string()]);
        if let Some(n) = auth_after {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        let at = &w.instances[inst];
        process::place(
            &mut cmd,
            &Placement {
                netns: at.netns.path(),
                cgroup: w.cgroups.dir(&format!("{}/moto-{port}", at.name)),
                cpu: None,
            },
        );
        let log = w.workdir.join(format!("moto-{port}.log"));
        let proc = process::spawn_logged(cmd, "moto", &log);
        let netns = at.netns.path();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !crate::netns::run_at(&netns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        }) {
            assert!(Instant::now() < deadline, "moto did not start listening");
            std::thread::sleep(Duration::from_millis(200));
        }
        Moto { proc, netns, port }
    }

    /// One AWS API call (JSON protocol with `target`, or a query-protocol form); moto
    /// routes on the service in the credential scope. Panics unless it answers 200.
    pub fn call(&self, service: &str, target: Option<&str>, body: String, form: bool) -> String {
        let (status, body) = self.try_call(service, target, body, form);
        assert_eq!(status, 200, "{service} {target:?}: {body}");
        body
    }

    pub fn try_call(
        &self,
        service: &str,
        target: Option<&str>,
        body: String,
        form: bool,
    ) -> (u16, String) {
        let port = self.port;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let (service, target) = (service.to_owned(), target.map(str::to_owned));
        crate::netns::run_at(&self.netns, move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("moto");
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let ctype = if form {
                "application/x-www-form-urlencoded"
            } else {
                "application/x-amz-json-1.1"
            };
            let mut req = format!(
                "POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\
                 Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0\r\n",
                body.len()
            );
            if let Some(t) = target {
                req += &format!("X-Amz-Target: {t}\r\n");
            }
            req += "\r\n";
            s.write_all(req.as_bytes()).unwrap();
            s.write_all(body.as_bytes()).unwrap();
            let mut resp = String::new();
            s.read_to_string(&mut resp).unwrap();
            let status = resp
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            (
                status,
                resp.split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_owned())
                    .unwrap_or_default(),
            )
        })
    }

    /// moto advances an ECS task's status (RUNNING → DEACTIVATING → … → STOPPED) on
    /// every DescribeTasks by default; real ECS does not. Tasks stay as StartTask left
    /// them (RUNNING) until StopTask.
    pub fn hold_ecs_tasks(&self) {
        let body = json!({ "model_name": "ecs::task",
                           "transition": { "progression": "manual", "times": 1_000_000_000u64 } })
        .to_string();
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let reply = crate::netns::run_at(&self.netns, move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("moto");
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let req = format!(
                "POST /moto-api/state-manager/set-transition HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).unwrap();
            let mut resp = String::new();
            s.read_to_string(&mut resp).unwrap();
            resp
        });
        assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    }

    pub fn ecs(&self, op: &str, body: Value) -> Value {
        let text = self.call(
            "ecs",
            Some(&format!("AmazonEC2ContainerServiceV20141113.{op}")),
            body.to_string(),
            false,
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    pub fn servicediscovery(&self, op: &str, body: Value) -> Value {
        let text = self.call(
            "servicediscovery",
            Some(&format!("Route53AutoNaming_v20170314.{op}")),
            body.to_string(),
            false,
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    pub fn secretsmanager(&self, op: &str, body: Value) -> Value {
        let text = self.call(
            "secretsmanager",
            Some(&format!("secretsmanager.{op}")),
            body.to_string(),
            false,
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// A new EC2 instance; returns its id.
    pub fn run_instance(&self) -> String {
        let xml = self.call(
            "ec2",
            None,
            "Action=RunInstances&ImageId=ami-12c6146b&MinCount=1&MaxCount=1&Version=2016-11-15"
                .into(),
            true,
        );
        xml.split("<instanceId>")
            .nth(1)
            .and_then(|s| s.split('<').next())
            .expect("ec2 instance id")
            .to_owned()
    }

    /// Registers EC2 instance `ec2_id` as a container instance of `cluster`; returns the
    /// container instance ARN.
    pub fn register_container_instance(&self, cluster: &str, ec2_id: &str) -> String {
        let doc = identity_document(ec2_id);
        let ci = self.ecs(
            "RegisterContainerInstance",
            json!({ "cluster": cluster, "instanceIdentityDocument": doc }),
        );
        ci["containerInstance"]["containerInstanceArn"]
            .as_str()
            .expect("container instance arn")
            .to_owned()
    }
}

/// A role session's credentials, as STS's AssumeRole returns them.
#[derive(Clone, Debug)]
pub struct RoleCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
}

impl RoleCredentials {
    /// The body the ECS agent's credential endpoint serves a task.
    pub fn container_json(&self, role_arn: &str) -> String {
        json!({ "RoleArn": role_arn, "AccessKeyId": self.access_key_id,
                "SecretAccessKey": self.secret_access_key, "Token": self.session_token,
                "Expiration": "2099-01-01T00:00:00Z" })
        .to_string()
    }
}

impl Moto {
    /// An IAM role its sessions may call `sts:GetCallerIdentity` with (2 requests).
    pub fn create_role(&self, name: &str) {
        let trust = json!({ "Version": "2012-10-17", "Statement": [{ "Effect": "Allow",
            "Principal": { "Service": "ecs-tasks.amazonaws.com" }, "Action": "sts:AssumeRole" }] });
        let allow = json!({ "Version": "2012-10-17", "Statement": [{ "Effect": "Allow",
            "Action": "sts:GetCallerIdentity", "Resource": "*" }] });
        self.call(
            "iam",
            None,
            format!(
                "Action=CreateRole&Version=2010-05-08&RoleName={name}&AssumeRolePolicyDocument={}",
                form_encode(&trust.to_string())
            ),
            true,
        );
        self.call(
            "iam",
            None,
            format!(
                "Action=PutRolePolicy&Version=2010-05-08&RoleName={name}&PolicyName=whoami&PolicyDocument={}",
                form_encode(&allow.to_string())
            ),
            true,
        );
    }

    /// A session of `role_arn` named `session` (1 request): what the ECS agent does for a
    /// task, with the task id as the session name.
    pub fn assume_role(&self, role_arn: &str, session: &str) -> RoleCredentials {
        let xml = self.call(
            "sts",
            None,
            format!(
                "Action=AssumeRole&Version=2011-06-15&RoleArn={}&RoleSessionName={session}",
                form_encode(role_arn)
            ),
            true,
        );
        let field = |tag: &str| {
            xml.split(&format!("<{tag}>"))
                .nth(1)
                .and_then(|s| s.split('<').next())
                .unwrap_or_else(|| panic!("AssumeRole: no {tag} in {xml}"))
                .to_owned()
        };
        RoleCredentials {
            access_key_id: field("AccessKeyId"),
            secret_access_key: field("SecretAccessKey"),
            session_token: field("SessionToken"),
        }
    }
}

/// `application/x-www-form-urlencoded` value encoding.
pub fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.proc.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.proc.wait_timeout(Duration::from_secs(5));
    }
}

/// An instance identity document as IMDS serves it (the fields the mesh reads and a few
/// more, like AWS's).
pub fn identity_document(ec2_id: &str) -> String {
    serde_json::to_string_pretty(&json!({
        "accountId": "123456789012",
        "architecture": "x86_64",
        "availabilityZone": "us-east-1a",
        "imageId": "ami-12c6146b",
        "instanceId": ec2_id,
        "instanceType": "m5.large",
        "pendingTime": "2026-12-01T10:00:00Z",
        "privateIp": "10.0.0.1",
        "region": "us-east-1",
        "version": "2017-09-30"
    }))
    .unwrap()
}

/// The test-only certificate whose key signs fixture identity documents (configure it as
/// the issuer's `iid_certificates`).
pub fn iid_certificate() -> PathBuf {
    repo_path("proxy-user/tests/fixtures/iid/certificate.pem")
}

/// base64 RSA-SHA256 signature of `document` with the fixture key (what IMDS's
/// `/latest/dynamic/instance-identity/signature` returns for AWS's key).
pub fn sign_document(document: &str) -> String {
    use rustls_pki_types::{PrivatePkcs8KeyDer, pem::PemObject};
    let pem = std::fs::read(repo_path(
        "proxy-user/tests/fixtures/iid/signing-key.pk8.pem",
    ))
    .expect("fixture IID key");
    let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).expect("PKCS#8 PEM");
    let key = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("RSA key");
    let mut sig = vec![0u8; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        document.as_bytes(),
        &mut sig,
    )
    .expect("sign");
    base64(&sig)
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// IMDS (v2 token, identity document, signature) on `addr` in `netns`.
pub fn imds(netns: &Netns, addr: SocketAddr, document: &str, signature: &str) -> HttpFixture {
    let f = HttpFixture::tcp_in(netns, addr);
    f.set("/latest/api/token", 200, "fixture-imds-token");
    f.set("/latest/dynamic/instance-identity/document", 200, document);
    f.set(
        "/latest/dynamic/instance-identity/signature",
        200,
        signature,
    );
    f
}

/// One task as the ECS agent's `/v1/tasks` reports it.
pub struct AgentTask<'a> {
    pub arn: String,
    pub family: &'a str,
    pub desired: &'a str,
    pub known: &'a str,
    pub container: &'a str,
    pub awsvpc: bool,
}

/// The agent's `/v1/tasks` document for `tasks`, built from the recorded agent fixture.
pub fn agent_tasks(tasks: &[AgentTask<'_>]) -> String {
    let template = fixture("agent-tasks.json")["Tasks"][0].clone();
    let ctemplate = template["Containers"][0].clone();
    let list: Vec<Value> = tasks
        .iter()
        .map(|t| {
            let mut v = template.clone();
            v["Arn"] = json!(t.arn);
            v["Family"] = json!(t.family);
            v["DesiredStatus"] = json!(t.desired);
            v["KnownStatus"] = json!(t.known);
            let mut c = ctemplate.clone();
            c["DockerId"] = json!(t.container);
            c["Name"] = json!("app");
            c["DockerName"] = json!(format!("ecs-{}-1-app-{}", t.family, &t.container[..8]));
            if t.awsvpc {
                c["Networks"] = json!([{ "NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.9.5"] }]);
            }
            v["Containers"] = json!([c]);
            v
        })
        .collect();
    json!({ "Tasks": list }).to_string()
}

/// A recorded ECS agent / Docker document from `proxy-user/tests/fixtures/ecs`.
pub fn fixture(name: &str) -> Value {
    let path = repo_path(&format!("proxy-user/tests/fixtures/ecs/{name}"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}
