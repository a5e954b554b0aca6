//! A two-instance world in issuer mode: moto plays ECS (a cluster, both instances as
//! container instances, tasks placed with StartTask), each instance has an IMDS fixture
//! with its signed identity document and a fixture ECS agent serving the same task ARNs,
//! and `ecsmesh issuer` runs in instance 1's netns. No node has a CA key.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use harness::{
    ProxyOptions, World,
    aws::{self, AgentTask, MOTO_PORT, Moto},
    fixture::HttpFixture,
    issuer::IssuerAddr,
    process::{self, Placement, Proc},
    world::{CLUSTER, ConnReport, client_args, run_client},
};
use serde_json::json;

use crate::common::{mesh::TRUST_DOMAIN, tools};

pub const ISSUER_PORT: u16 = 8443;
pub const ISSUER_ADMIN: &str = "127.0.0.1:8444";
pub const IMDS: &str = "127.0.0.1:1338";
pub const TEMPLATE: &str = "spiffe://{trust_domain}/ecs/{cluster}/{family}/{task_role}";

/// An ECS task placed by moto on a container instance.
#[derive(Clone, Debug)]
pub struct EcsTask {
    pub arn: String,
    pub id: String,
    pub family: String,
    pub container: String,
    pub cgroup: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Lifetimes {
    pub svid_secs: u64,
    pub node_secs: u64,
    /// The issuer loads its CA from a Secrets Manager secret (in moto) instead of
    /// `ca_dir`.
    pub ca_secret: bool,
}

/// The Secrets Manager secret holding the issuing CA (see `Lifetimes::ca_secret`).
pub const CA_SECRET: &str = "ecsmesh/issuer-ca";

pub struct Issued {
    pub w: World,
    pub moto: Moto,
    pub issuer: Option<Proc>,
    pub issuer_config: PathBuf,
    pub state_file: PathBuf,
    pub agents: Vec<HttpFixture>,
    pub imds: Vec<HttpFixture>,
    /// EC2 instance id and container instance ARN per instance.
    pub ec2: Vec<String>,
    pub ci: Vec<String>,
    /// The identity document and signature each instance's IMDS serves.
    pub documents: Vec<(String, String)>,
    /// Runs on instance 0 and calls `orders`.
    pub client: EcsTask,
    /// Runs on instance 1 behind `ep`.
    pub orders: EcsTask,
    pub ep: SocketAddr,
}

pub fn role_arn(name: &str) -> String {
    format!("arn:aws:iam::123456789012:role/{name}")
}

/// `spiffe://mesh.test/ecs/test/<family>/<role>`: what TEMPLATE renders.
pub fn identity(family: &str, role: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ecs/{CLUSTER}/{family}/{role}")
}

impl Issued {
    /// `federated`: a bundle of another trust domain's anchors the issuer trusts too.
    /// The issuer runs and both node proxies are ready with their tasks' identities.
    pub fn new(life: Lifetimes, federated: Option<PathBuf>) -> Issued {
        let mut this = Self::world(life, federated);
        this.start_issuer();
        for i in [1, 0] {
            let opts = this.proxy_options(i);
            this.w.instances[i].start_proxy(&opts);
        }
        this.wait_until(
            "both tasks hold their identities",
            Duration::from_secs(30),
            |s| {
                s.holds(0, &identity("client", "client-app"))
                    && s.holds(1, &identity("orders", "orders-api"))
            },
        );
        this
    }

    /// Everything but the issuer and the proxies: moto with the cluster, its instances
    /// and tasks, IMDS and agent fixtures, the issuer's config, the orders endpoint.
    pub fn world(life: Lifetimes, federated: Option<PathBuf>) -> Issued {
        let mut w = World::new(tools(), 2);
        w.enable_issuer_mesh(TRUST_DOMAIN);
        let moto = Moto::start(&w, 1);
        moto.hold_ecs_tasks();
        moto.ecs("CreateCluster", json!({ "clusterName": CLUSTER }));
        let mut ec2 = Vec::new();
        let mut ci = Vec::new();
        for _ in 0..2 {
            let id = moto.run_instance();
            ci.push(moto.register_container_instance(CLUSTER, &id));
            ec2.push(id);
        }
        for (family, role) in [("orders", "orders-api"), ("client", "client-app")] {
            moto.ecs(
                "RegisterTaskDefinition",
                json!({ "family": family, "taskRoleArn": role_arn(role),
                        "containerDefinitions": [{ "name": "app", "image": "app:1", "memory": 128 }] }),
            );
        }
        let client = start_task(&moto, &w, 0, "client", &ci[0]);
        let orders = start_task(&moto, &w, 1, "orders", &ci[1]);

        let mut documents = Vec::new();
        let mut imds = Vec::new();
        let mut agents = Vec::new();
        for i in 0..2 {
            let doc = aws::identity_document(&ec2[i]);
            let sig = aws::sign_document(&doc);
            imds.push(aws::imds(
                &w.instances[i].netns,
                IMDS.parse().unwrap(),
                &doc,
                &sig,
            ));
            documents.push((doc, sig));
            let agent =
                HttpFixture::tcp_in(&w.instances[i].netns, "127.0.0.1:51678".parse().unwrap());
            agent.set(
                "/v1/metadata",
                200,
                json!({ "Cluster": CLUSTER, "ContainerInstanceArn": ci[i], "Version": "Amazon ECS Agent - v1.89.2" })
                    .to_string(),
            );
            let task = if i == 0 { &client } else { &orders };
            agent.set("/v1/tasks", 200, agent_tasks(&[task]));
            agents.push(agent);
        }

        let state_file = w.workdir.join("issuer-state.json");
        let issuer_config = w.workdir.join("issuer.toml");
        let mut bundle = w.ca_dir().join("bundle.pem");
        if let Some(extra) = federated {
            let mut text = std::fs::read_to_string(&bundle).unwrap();
            text += &std::fs::read_to_string(extra).unwrap();
            bundle = w.workdir.join("issuer-federated-bundle.pem");
            std::fs::write(&bundle, text).unwrap();
        }
        std::fs::write(
            &issuer_config,
            format!(
                "listen = \"0.0.0.0:{ISSUER_PORT}\"\nadmin_addr = \"{ISSUER_ADMIN}\"\n\
                 trust_domain = \"{TRUST_DOMAIN}\"\ncluster = \"{CLUSTER}\"\ntemplate = \"{TEMPLATE}\"\n\
                 svid_lifetime_secs = {}\nnode_cert_lifetime_secs = {}\nbundle = \"{}\"\n\
                 iid_certificates = [\"{}\"]\nstate_file = \"{}\"\n\
                 aws_endpoint = \"http://127.0.0.1:{MOTO_PORT}\"\nregion = \"us-east-1\"\n",
                life.svid_secs,
                life.node_secs,
                bundle.display(),
                aws::iid_certificate().display(),
                state_file.display(),
            ),
        )
        .unwrap();

        let ca_source = if life.ca_secret {
            let dir = w.issuer_ca_dir();
            let pem = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
            let secret =
                json!({ "certificate": pem("issuer.pem"), "private_key": pem("issuer.key") });
            moto.secretsmanager(
                "CreateSecret",
                json!({ "Name": CA_SECRET, "SecretString": secret.to_string() }),
            );
            format!("ca_secret = \"{CA_SECRET}\"\n")
        } else {
            format!("ca_dir = \"{}\"\n", w.issuer_ca_dir().display())
        };
        std::fs::write(
            &issuer_config,
            std::fs::read_to_string(&issuer_config).unwrap() + &ca_source,
        )
        .unwrap();
        let ep = w.instances[1].addr(9000);
        w.instances[1].echo_server(&[ep]);
        let discovery = w.instances[1].mesh.as_ref().unwrap().discovery.clone();
        std::fs::write(
            &discovery,
            format!(
                "[[services]]\nname = \"orders\"\n[[services.endpoints]]\naddress = \"{ep}\"\nfamily = \"orders\"\n\
                 task = \"{}\"\nidentity = \"{}\"\n",
                orders.id,
                identity("orders", "orders-api")
            ),
        )
        .unwrap();
        Issued {
            w,
            moto,
            issuer: None,
            issuer_config,
            state_file,
            agents,
            imds,
            ec2,
            ci,
            documents,
            client,
            orders,
            ep,
        }
    }

    pub fn proxy_options(&self, i: usize) -> ProxyOptions {
        ProxyOptions {
            enrol: Some(vec![]),
            issuer: Some((
                format!("https://10.0.0.2:{ISSUER_PORT}"),
                format!("imds_url = \"http://{IMDS}\""),
            )),
            identity_template: Some(TEMPLATE.into()),
            // `ecsmesh ca activate/retire --node` reads /trust from instance 0.
            admin_on_fabric: true,
            extra_toml: format!(
                "\n[ecs]\ncgroup_root = \"{}\"\nlayout = \"v2\"\npoll_interval_ms = 200\n",
                self.w.instances[i].cgroup_root.display()
            ),
            ..Default::default()
        }
    }

    /// Starts (or restarts) `ecsmesh issuer` in instance 1's netns and waits until it
    /// accepts connections.
    pub fn start_issuer(&mut self) {
        let mut cmd = std::process::Command::new(&self.w.tools.ecsmesh);
        cmd.arg("issuer")
            .arg("run")
            .arg("--config")
            .arg(&self.issuer_config);
        process::place(
            &mut cmd,
            &Placement {
                netns: self.w.instances[1].netns.path(),
                cgroup: self.w.cgroups.dir("inst1/issuer"),
                cpu: None,
            },
        );
        let log = self
            .w
            .workdir
            .join(format!("issuer-{}.log", harness::uid()));
        self.issuer = Some(process::spawn_logged(cmd, "ecsmesh issuer", &log));
        let addr: SocketAddr = format!("10.0.0.2:{ISSUER_PORT}").parse().unwrap();
        self.wait_until("the issuer listens", Duration::from_secs(20), move |s| {
            s.w.instances[1].netns.run(move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
        });
    }

    pub fn stop_issuer(&mut self) {
        if let Some(mut p) = self.issuer.take() {
            p.signal(nix::sys::signal::Signal::SIGKILL);
            let _ = p.wait_timeout(Duration::from_secs(5));
        }
    }

    /// The issuer as seen from instance `i`.
    pub fn issuer_addr(&self, i: usize) -> IssuerAddr {
        IssuerAddr {
            netns: self.w.instances[i].netns.path(),
            addr: format!("10.0.0.2:{ISSUER_PORT}").parse().unwrap(),
        }
    }

    /// The issuer's Prometheus text.
    pub fn issuer_metrics(&self) -> prometheus_parse::Scrape {
        let (status, body) = self.w.instances[1]
            .netns
            .http_get(ISSUER_ADMIN.parse().unwrap(), "/metrics")
            .expect("issuer /metrics");
        assert_eq!(status, 200, "{body}");
        harness::metrics::parse(&body)
    }

    /// Instance `i`'s node certificate and key (what its proxy keeps in its state dir).
    pub fn node_cert(&self, i: usize) -> (PathBuf, PathBuf) {
        let dir = self.state_dir(i).join("identity");
        (dir.join("node.pem"), dir.join("node.key"))
    }

    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.w
            .workdir
            .join(format!("{}-state", self.w.instances[i].name))
    }

    /// Whether instance `i`'s proxy holds a certificate for `id` (`/identities`).
    pub fn holds(&self, i: usize, id: &str) -> bool {
        let inst = &self.w.instances[i];
        let Ok((200, body)) = inst.netns.http_get(inst.admin, "/identities") else {
            return false;
        };
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .into_iter()
            .flatten()
            .any(|e| e["identity"] == id)
    }

    /// `repeat` connections from the client task (instance 0) to the orders endpoint.
    pub fn call_orders(&self, repeat: usize) -> Vec<ConnReport> {
        self.orders_caller()(repeat)
    }

    /// [`Self::call_orders`] as a function another thread can run (background load).
    pub fn orders_caller(&self) -> impl Fn(usize) -> Vec<ConnReport> + Send + 'static {
        let meshtool = self.w.tools.meshtool.clone();
        let at = Placement {
            netns: self.w.instances[0].netns.path(),
            cgroup: self.client.cgroup.clone(),
            cpu: None,
        };
        let ep = self.ep;
        move |repeat| {
            let mut cmd = std::process::Command::new(&meshtool);
            cmd.args(client_args(&[ep], repeat, 1000));
            process::place(&mut cmd, &at);
            run_client(cmd)
        }
    }

    pub fn wait_until(&self, what: &str, within: Duration, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Issued {
    fn drop(&mut self) {
        self.stop_issuer();
    }
}

/// StartTask with `containerInstances` (moto's RunTask ignores placement), and the task's
/// container cgroup where the agent's layout puts it.
fn start_task(moto: &Moto, w: &World, inst: usize, family: &str, ci: &str) -> EcsTask {
    let r = moto.ecs(
        "StartTask",
        json!({ "cluster": CLUSTER, "taskDefinition": family, "containerInstances": [ci] }),
    );
    let arn = r["tasks"][0]["taskArn"]
        .as_str()
        .unwrap_or_else(|| panic!("StartTask: {r}"))
        .to_owned();
    let id = arn.rsplit('/').next().unwrap().to_owned();
    let hex: String = id.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let container = format!("{hex}{hex}").chars().take(64).collect::<String>();
    // systemd nests a slice per dash: moto's task ids are UUIDs with dashes (ECS's are
    // 32 hex digits), so the agent's layout puts them one slice per prefix.
    let parts: Vec<&str> = id.split('-').collect();
    let mut rel = format!("{}/ecstasks.slice", w.instances[inst].name);
    for k in 1..=parts.len() {
        rel += &format!("/ecstasks-{}.slice", parts[..k].join("-"));
    }
    let cgroup = w.cgroups.dir(&format!("{rel}/docker-{container}.scope"));
    EcsTask {
        arn,
        id,
        family: family.to_owned(),
        container,
        cgroup,
    }
}

pub fn agent_tasks(tasks: &[&EcsTask]) -> String {
    let list: Vec<AgentTask> = tasks
        .iter()
        .map(|t| AgentTask {
            arn: t.arn.clone(),
            family: &t.family,
            desired: "RUNNING",
            known: "RUNNING",
            container: &t.container,
            awsvpc: false,
        })
        .collect();
    aws::agent_tasks(&list)
}

/// Every file below `dir`, recursively.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_below(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Another trust domain's CA, with its own issuing CA.
pub struct PartnerCa {
    dir: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl PartnerCa {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("ecsmesh-partner-{}", harness::uid()));
        let ca = dir.join("ca");
        let run = |args: &[&str]| {
            let out = std::process::Command::new(tools().ecsmesh)
                .arg("ca")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ca_s = ca.display().to_string();
        run(&["init", "--trust-domain", "partner.test", "--out", &ca_s]);
        let issuer = dir.join("issuer").display().to_string();
        run(&[
            "issue-intermediate",
            "--ca",
            &ca_s,
            "--instance",
            "p",
            "--out",
            &issuer,
        ]);
        PartnerCa {
            dir: tempdir::Dir(dir),
        }
    }

    /// The partner's anchors.
    pub fn bundle(&self) -> PathBuf {
        self.dir.0.join("ca/bundle.pem")
    }

    /// A node certificate of the partner's trust domain naming our instance `ec2`.
    pub fn node_cert(&self, w: &harness::World, ec2: &str) -> (PathBuf, PathBuf) {
        let ca = self.dir.0.join("ca").display().to_string();
        let issuer = self.dir.0.join("issuer").display().to_string();
        let uri = format!("spiffe://partner.test/ecsmesh/node/{ec2}");
        crate::common::mesh::issue(
            w,
            "partner-node",
            &["--ca", &ca, "--issuer", &issuer, "--uri", &uri],
        )
    }
}

/// `ecsmesh ca issue --ca <our CA> <args>`: (chain, key).
pub fn issue(w: &harness::World, name: &str, args: &[&str]) -> (PathBuf, PathBuf) {
    let ca = w.ca_dir().display().to_string();
    let mut full = vec!["--ca", ca.as_str()];
    full.extend_from_slice(args);
    crate::common::mesh::issue(w, name, &full)
}
