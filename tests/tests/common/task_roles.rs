//! Sidecars in the issuer world: each task proves itself with its own IAM role. A second
//! moto plays STS with authentication on (so signatures are really checked); each task
//! gets a role session named after its task id, as the ECS agent does, served by the
//! instance's agent fixture as the task's container credentials; each task's task metadata
//! (v4) is served there too. `ecsmesh sidecar` runs in the task's cgroup, with nothing
//! but the generic config and the environment the ECS agent gives a container.
#![allow(dead_code)]

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use harness::{
    ProxyOptions,
    aws::{Moto, RoleCredentials, STS_MOTO_PORT},
    process::{self, Placement, Proc},
    world::CLUSTER,
};
use serde_json::json;

use crate::issued::{EcsTask, ISSUER_PORT, Issued, TEMPLATE, role_arn};

pub const STS_URL: &str = "http://127.0.0.1:5001";
/// Requests moto-STS takes before it checks signatures: the setup below.
const SETUP_REQUESTS: usize = 2 * 2 + 2 + 1;
pub const AGENT: &str = "127.0.0.1:51678";

/// An `ecsmesh sidecar` of an ECS task. Drop: SIGTERM, wait, and (in case the test
/// failed before the sidecar could) uninstall its pins.
pub struct EcsSidecar {
    pub proc: Proc,
    pub pin_dir: PathBuf,
    /// The task's cgroup, where its programs attach.
    pub task_cgroup: PathBuf,
    pub log: PathBuf,
    ecsmesh: PathBuf,
}

impl EcsSidecar {
    /// SIGTERM, as ECS stops a task's last container; the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.signal(nix::sys::signal::Signal::SIGTERM);
        self.proc.wait_timeout(Duration::from_secs(10))
    }
}

impl Drop for EcsSidecar {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::process::Command::new(&self.ecsmesh)
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output();
    }
}

pub struct TaskRoles {
    pub sts: Moto,
    /// The client's and orders' role sessions.
    pub client: RoleCredentials,
    pub orders: RoleCredentials,
    /// A session of the client's role named after the *orders* task (a task that may
    /// assume its own role picks any session name).
    pub client_role_as_orders: RoleCredentials,
}

impl Issued {
    /// moto-STS with authentication (instance 1, beside the issuer), the roles and the
    /// tasks' sessions; the issuer forwards task-role attestations to it.
    pub fn enable_task_roles(&mut self) -> TaskRoles {
        let sts = Moto::start_authenticated(&self.w, 1, SETUP_REQUESTS);
        sts.create_role("client-app");
        sts.create_role("orders-api");
        let client = sts.assume_role(&role_arn("client-app"), &self.client.id);
        let orders = sts.assume_role(&role_arn("orders-api"), &self.orders.id);
        let client_role_as_orders = sts.assume_role(&role_arn("client-app"), &self.orders.id);
        let mut text = std::fs::read_to_string(&self.issuer_config).unwrap();
        text += &format!("sts_url = \"{STS_URL}\"\n");
        std::fs::write(&self.issuer_config, text).unwrap();
        assert_eq!(STS_MOTO_PORT, 5001);
        TaskRoles {
            sts,
            client,
            orders,
            client_role_as_orders,
        }
    }

    /// `ecsmesh sidecar` for `task` on instance `i`, in a container cgroup of its own below
    /// the task's (as ECS places a sidecar container), with the agent's environment: the
    /// task metadata endpoint and the credential endpoint. Waits for ready.
    pub fn start_sidecar(
        &mut self,
        i: usize,
        task: &EcsTask,
        role: &str,
        creds: &RoleCredentials,
    ) -> EcsSidecar {
        let agent = &self.agents[i];
        agent.set(
            &format!("/v4/{}/task", task.id),
            200,
            json!({ "Cluster": CLUSTER, "TaskARN": task.arn, "Family": task.family, "Revision": "1",
                    "DesiredStatus": "RUNNING", "KnownStatus": "RUNNING",
                    "Containers": [{ "DockerId": task.container, "Name": "app", "Type": "NORMAL" }] })
            .to_string(),
        );
        agent.set(
            &format!("/v2/credentials/{}", task.id),
            200,
            creds.container_json(&role_arn(role)),
        );
        let opts = ProxyOptions {
            enrol: Some(vec![]),
            issuer: Some((
                format!("https://10.0.0.2:{ISSUER_PORT}"),
                format!(
                    "attestation = \"task_role\"\nregion = \"us-east-1\"\nsts_url = \"{STS_URL}\""
                ),
            )),
            identity_template: Some(TEMPLATE.into()),
            ..Default::default()
        };
        let inst = &self.w.instances[i];
        let config = self.w.workdir.join(format!("sidecar-{}.toml", task.family));
        std::fs::write(&config, inst.config_text(&opts)).unwrap();
        let mut cmd = std::process::Command::new(&self.w.tools.ecsmesh);
        cmd.arg("sidecar")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env(
                "ECS_CONTAINER_METADATA_URI_V4",
                format!("http://{AGENT}/v4/{}", task.id),
            )
            .env(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                format!("http://{AGENT}/v2/credentials/{}", task.id),
            );
        let slice = task.cgroup.parent().unwrap();
        let cgroup = slice.join("docker-sidecar.scope");
        std::fs::create_dir_all(&cgroup).unwrap();
        process::place(
            &mut cmd,
            &Placement {
                netns: inst.netns.path(),
                cgroup,
                cpu: None,
            },
        );
        let log = self
            .w
            .workdir
            .join(format!("sidecar-{}-{}.log", task.family, harness::uid()));
        let mut proc = process::spawn_logged(cmd, "ecsmesh sidecar", &log);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = inst.netns.http_get(inst.admin, "/ready") {
                return EcsSidecar {
                    proc,
                    pin_dir: inst.pin_dir.join(&task.id),
                    task_cgroup: slice.to_path_buf(),
                    log,
                    ecsmesh: self.w.tools.ecsmesh.clone(),
                };
            }
            let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
            if let Ok(Some(st)) = proc.child.try_wait() {
                panic!(
                    "ecsmesh sidecar exited ({st}) before ready:\n{}",
                    log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "sidecar not ready in 30 s:\n{}",
                log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
