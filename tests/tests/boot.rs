//! `deploy/` proven by booting an instance's user data (issue 15): the launch template's
//! user data, taken from `deploy/cloudformation.yaml` and rendered with a test stack's
//! parameters, runs with bash in an emulated instance root in a private mount namespace
//! (`harness::boot`), with stubs for `systemctl`, `docker`, `aws` and `dnf`; a fixture IMDS
//! answers on 169.254.169.254:80 inside the instance's netns, and no flag points the
//! node or bootstrap elsewhere. `docker run … bootstrap` runs the real `ecsmesh` with only
//! the container's mounts. The node then runs from exactly the config the user data
//! wrote, at the paths a real instance has: as the daemon service's task (started, as the
//! ECS agent would, from the template's `DaemonTaskDefinition` through the same `docker
//! run` emulation), or from the `ecsmesh.service` unit the systemd launcher installed.
//! The world around it is `common/issued.rs` as the stack configures it: moto as ECS and
//! Cloud Map, `ecsmesh issuer` (default identity template) reached by its Cloud Map
//! name, a fixture ECS agent and Docker. Broken copies of the template or of the
//! written config fail naming what is wrong.
//!
//! The sidecar half: on an instance booted the same way, a task of
//! `deploy/task-definition-sidecar.json` runs its `ecsmesh` container as the ECS agent
//! would start it for an `awsvpc` task (see `SidecarTask`), with the agent's task metadata
//! and credential endpoints as fixtures on 169.254.170.2 and moto-STS (authentication on)
//! as the region's STS; it reads the config the user data wrote, proves its task with the
//! task role and meshes the task's traffic. Broken copies (no `--sidecar-out`, no host
//! cgroup mount) fail naming the missing path.
mod common;
#[path = "common/issued.rs"]
mod issued;
#[path = "common/task_roles.rs"]
mod task_roles;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{mesh::TRUST_DOMAIN, *};
use harness::{
    NetworkMode::Bridge,
    World, aws,
    boot::{Machine, MachineSpec, StackParams, Template, docker_run_args, ecs_docker_run_args},
    fixture::HttpFixture,
    metrics::counter,
    process::{self, Proc},
    world::CLUSTER,
};
use issued::{EcsTask, Issued, Lifetimes, role_arn};
use serde_json::{Value, json};
use task_roles::{STS_URL, TaskRoles};

const LONG: Lifetimes = Lifetimes {
    svid_secs: 3600,
    node_secs: 3600,
    ca_secret: false,
};

const REGION: &str = "us-east-1";
/// An ECR image, so the user data's `docker login` path runs too.
const IMAGE: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com/ecsmesh:boot-test";
/// Where EC2's instance metadata service answers (the user data passes no override).
const IMDS_ADDR: &str = "169.254.169.254:80";
/// The issuer's address on the harness fabric (instance 1).
const ISSUER_IP: &str = "10.0.0.2";

fn template_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cloudformation.yaml"
    ))
}

/// What the stack's default issuer template gives a task family.
fn default_identity(family: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ecs/{CLUSTER}/{family}")
}

/// The stack a user would launch: the cluster is named after the stack (`CLUSTER`), the
/// meshed service is the world's `orders`; every other parameter keeps its default.
fn stack(t: &Template, launcher: &str) -> StackParams {
    t.params(&[
        ("AWS::Region", json!(REGION)),
        ("AWS::StackName", json!(CLUSTER)),
        ("AWS::AccountId", json!("123456789012")),
        ("AWS::Partition", json!("aws")),
        ("VpcId", json!("vpc-0b00710000000000")),
        ("SubnetIds", json!(["subnet-0b0071000000000"])),
        ("ImageUri", json!(IMAGE)),
        ("TrustDomain", json!(TRUST_DOMAIN)),
        (
            "CaSecretArn",
            json!("arn:aws:secretsmanager:us-east-1:123456789012:secret:ecsmesh/issuer-ca"),
        ),
        ("ProxyLauncher", json!(launcher)),
        ("MeshedServices", json!(["orders"])),
    ])
}

fn param(params: &StackParams, name: &str) -> String {
    params[name]
        .as_str()
        .unwrap_or_else(|| panic!("parameter {name}"))
        .to_owned()
}

/// The name Cloud Map gives the issuer task's A record: its service's name in the
/// stack's namespace. Taken from the resources, not from the user data, so a user data
/// that names the issuer differently does not resolve.
fn issuer_dns_name(t: &Template, params: &StackParams) -> String {
    let name = t
        .eval_str(
            &t.resource("IssuerDiscoveryService")["Properties"]["Name"],
            params,
            &Default::default(),
        )
        .unwrap();
    format!("{name}.{}", param(params, "NamespaceName"))
}

/// One booted container instance: its emulated root, its IMDS and Docker fixtures, the
/// node (the daemon service's task or the systemd unit). Drop stops the node, detaches
/// its programs and ends the namespaces (also when a test fails).
struct Booted {
    node: Option<Proc>,
    node_log: PathBuf,
    machine: Machine,
    _imds: HttpFixture,
    docker: HttpFixture,
    template: Template,
    params: StackParams,
    proxy_cgroup: PathBuf,
}

impl Booted {
    /// Instance `i` of `w` boots `template`'s user data with `params`; its IMDS serves
    /// (`document`, `signature`). Panics with the script's output and the stubs' log
    /// when the user data fails.
    fn boot(
        w: &World,
        i: usize,
        template: Template,
        params: StackParams,
        (document, signature): (&str, &str),
    ) -> Booted {
        let inst = &w.instances[i];
        // EC2's link-local IMDS address, inside this instance's netns only.
        inst.netns
            .ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
        let imds = aws::imds(&inst.netns, IMDS_ADDR.parse().unwrap(), document, signature);
        let bundle = std::fs::read_to_string(w.ca_dir().join("bundle.pem")).unwrap();
        // The VPC resolver answers the issuer's Cloud Map name with the issuer task's
        // address: here /etc/hosts, which the containers (host network) get a copy of.
        let hosts = format!(
            "127.0.0.1 localhost\n{ISSUER_IP} {}\n",
            issuer_dns_name(&template, &params)
        );
        let root = w.workdir.join(format!("{}-root", inst.name));
        let machine = Machine::new(&MachineSpec {
            netns: inst.netns.path(),
            cgroup_root: inst.cgroup_root.clone(),
            boot_cgroup: w.cgroups.dir(&format!("{}/boot", inst.name)),
            root,
            ecsmesh: &w.tools.ecsmesh,
            image_uri: IMAGE,
            hosts: &hosts,
            ssm: &[(&param(&params, "TrustBundleParameter"), &bundle)],
            region: REGION,
        });
        // Docker on the instance (health gating reads it through the mounted socket).
        let docker = HttpFixture::unix(&machine.path("/run/docker.sock"));
        let script = template
            .user_data(&params)
            .unwrap_or_else(|e| panic!("rendering the user data: {e}"));
        let (ok, out) = machine.run_user_data(&script, Duration::from_secs(60));
        assert!(
            ok,
            "the user data failed: {out}\nstub calls:\n{}",
            machine.stub_calls().join("\n")
        );
        Booted {
            node: None,
            node_log: w.workdir.join(format!("{}-daemon-task.log", inst.name)),
            machine,
            _imds: imds,
            docker,
            template,
            params,
            proxy_cgroup: w.cgroups.dir(&format!("{}/proxy", inst.name)),
        }
    }

    /// `docker run` of the daemon service's task definition as the ECS agent would start
    /// it, with `command` instead of the definition's when given. The environment adds
    /// what stands in for the task role: static credentials and moto as every AWS
    /// endpoint (the agent would give a credentials URI; AWS is not reachable here).
    fn daemon_task(&self, command: Option<&[&str]>) -> std::process::Command {
        let env = aws_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let args = docker_run_args(
            &self.template,
            "DaemonTaskDefinition",
            &self.params,
            &env,
            command,
        );
        let mut argv = vec!["docker"];
        argv.extend(args.iter().map(String::as_str));
        self.machine.command(&argv, Some(&self.proxy_cgroup))
    }

    /// `ecsmesh check-config` of `config` inside the daemon task (its mounts, its paths):
    /// (succeeded, stdout + stderr).
    fn check_config(&self, config: &str) -> (bool, String) {
        let out = process::run(self.daemon_task(Some(&["check-config", "--config", config])));
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Starts the daemon service's task (the node); does not wait.
    fn start_daemon(&mut self) {
        let cmd = self.daemon_task(None);
        self.node = Some(process::spawn_logged(
            cmd,
            "ecsmesh daemon task",
            &self.node_log,
        ));
    }

    /// Starts `ecsmesh.service` as systemd would, from the unit the user data installed:
    /// its `ExecStart` on the instance (host paths), its `Environment`, its
    /// `CapabilityBoundingSet` and `NoNewPrivileges` (the AWS stand-ins of
    /// [`aws_env`] added: on an instance the node would use the instance profile).
    fn start_unit(&mut self) {
        let unit = self.machine.read("/etc/systemd/system/ecsmesh.service");
        let values = |key: &str| -> Vec<String> {
            unit.lines()
                .filter_map(|l| l.strip_prefix(&format!("{key}=")))
                .map(str::to_owned)
                .collect()
        };
        let exec = values("ExecStart");
        assert_eq!(exec.len(), 1, "one ExecStart in:\n{unit}");
        let mut argv: Vec<String> = vec!["env".into()];
        argv.extend(values("Environment"));
        argv.extend(aws_env().iter().map(|(k, v)| format!("{k}={v}")));
        argv.push("setpriv".into());
        if values("NoNewPrivileges") == ["yes"] {
            argv.push("--no-new-privs".into());
        }
        let mut bounding = "-all".to_owned();
        for set in values("CapabilityBoundingSet") {
            for cap in set.split_whitespace() {
                bounding += &format!(",+{}", cap.trim_start_matches("CAP_").to_lowercase());
            }
        }
        argv.extend([
            format!("--bounding-set={bounding}"),
            "--inh-caps=-all".into(),
            "--".into(),
        ]);
        argv.extend(exec[0].split_whitespace().map(str::to_owned));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let cmd = self.machine.command(&argv, Some(&self.proxy_cgroup));
        self.node = Some(process::spawn_logged(
            cmd,
            "ecsmesh.service",
            &self.node_log,
        ));
    }

    fn node_log(&self) -> String {
        std::fs::read_to_string(&self.node_log).unwrap_or_default()
    }

    /// Fails when the node has exited.
    fn assert_node_running(&mut self) {
        if let Some(p) = self.node.as_mut()
            && let Ok(Some(st)) = p.child.try_wait()
        {
            panic!("the node exited ({st}):\n{}", self.node_log());
        }
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        if let Some(mut p) = self.node.take() {
            p.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = p.wait_timeout(Duration::from_secs(15));
        }
        // SIGTERM keeps the pins (a restart takes over): detach like an operator would.
        self.machine.shut_down(Some(&[
            "/opt/ecsmesh-test/image/usr/local/bin/ecsmesh",
            "uninstall",
            "--pin-dir",
            "/sys/fs/bpf/ecsmesh",
        ]));
    }
}

/// What stands in for the node's AWS credentials (the daemon task's role, the instance
/// profile under systemd) and for AWS itself: static keys and moto as every endpoint.
fn aws_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "AWS_ENDPOINT_URL",
            format!("http://{ISSUER_IP}:{}", aws::MOTO_PORT),
        ),
        ("AWS_ACCESS_KEY_ID", "ecsmesh-boot-test".into()),
        ("AWS_SECRET_ACCESS_KEY", "ecsmesh-boot-test".into()),
    ]
}

/// The `Issued` world as the stack configures it: the issuer with its default identity
/// template (the stack's issuer config names none), instance 1's node likewise, the
/// orders endpoint registered in Cloud Map (namespace and service of the stack's
/// parameters) as ECS service discovery registers a task. Instance 0 has no node yet.
fn stack_world(params: &StackParams) -> Issued {
    stack_world_with(params, |_| ()).0
}

/// [`stack_world`], with `before_issuer` run on the world before the issuer starts (its
/// config may still change).
fn stack_world_with<T>(
    params: &StackParams,
    before_issuer: impl FnOnce(&mut Issued) -> T,
) -> (Issued, T) {
    let mut s = Issued::world(LONG, None);
    let issuer_toml = std::fs::read_to_string(&s.issuer_config).unwrap();
    let without: String = issuer_toml
        .lines()
        .filter(|l| !l.starts_with("template ="))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without, issuer_toml, "the issuer config named a template");
    std::fs::write(&s.issuer_config, without).unwrap();
    let discovery = s.w.instances[1].mesh.as_ref().unwrap().discovery.clone();
    std::fs::write(
        &discovery,
        format!(
            "[[services]]\nname = \"orders\"\n[[services.endpoints]]\naddress = \"{}\"\nfamily = \"orders\"\ntask = \"{}\"\n",
            s.ep, s.orders.id
        ),
    )
    .unwrap();
    let namespace = param(params, "NamespaceName");
    s.moto
        .servicediscovery("CreateHttpNamespace", json!({ "Name": namespace }));
    let ns = s.moto.servicediscovery("ListNamespaces", json!({}))["Namespaces"][0]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    let service = params["MeshedServices"][0].as_str().unwrap().to_owned();
    assert_eq!(service, "orders");
    let svc = s.moto.servicediscovery(
        "CreateService",
        json!({ "Name": service, "NamespaceId": ns }),
    )["Service"]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.moto.servicediscovery(
        "RegisterInstance",
        json!({ "ServiceId": svc, "InstanceId": s.orders.id,
                "Attributes": { "AWS_INSTANCE_IPV4": s.ep.ip().to_string(),
                                "AWS_INSTANCE_PORT": s.ep.port().to_string(),
                                "ECS_TASK_DEFINITION_FAMILY": "orders" } }),
    );
    let t = before_issuer(&mut s);
    s.start_issuer();
    let mut opts = s.proxy_options(1);
    opts.identity_template = None;
    s.w.instances[1].start_proxy(&opts);
    (s, t)
}

/// Docker's answer for the client task's container (no health check: gating passes it).
fn serve_client_container(b: &Booted, container: &str) {
    let mut d = aws::fixture("docker-inspect-no-healthcheck.json");
    d["Id"] = json!(container);
    b.docker
        .set(&format!("/containers/{container}/json"), 200, d.to_string());
}

fn wait_for(what: &str, within: Duration, b: &mut Booted, mut f: impl FnMut(&Booted) -> bool) {
    let deadline = Instant::now() + within;
    while !f(b) {
        b.assert_node_running();
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\nnode log:\n{}",
            b.node_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The calls the stubs saw, in order, each matching one of `expected` (substrings), and
/// every expected one seen.
#[track_caller]
fn assert_calls_in_order(calls: &[String], expected: &[&str]) {
    let mut at = 0;
    for e in expected {
        match calls[at..].iter().position(|c| c.contains(e)) {
            Some(k) => at += k + 1,
            None => panic!(
                "no call matching {e:?} after call {at} in:\n{}",
                calls.join("\n")
            ),
        }
    }
}

#[test]
fn daemon_user_data_boots_a_node_that_attests_enrols_and_meshes() {
    boots_a_node_that_attests_enrols_and_meshes("ecs-daemon");
}

#[test]
fn systemd_user_data_boots_a_node_that_attests_enrols_and_meshes() {
    boots_a_node_that_attests_enrols_and_meshes("systemd");
}

/// The stack with `ProxyLauncher = launcher` boots instance 0 of the stack's world; its
/// node attests, enrols the client task the agent reports and carries its traffic to
/// orders (instance 1) over mTLS with the issuer's identities.
fn boots_a_node_that_attests_enrols_and_meshes(launcher: &str) {
    let daemon = launcher == "ecs-daemon";
    let template = Template::load(&template_path());
    let params = stack(&template, launcher);
    let s = stack_world(&params);
    let doc = s.documents[0].clone();
    let mut b = Booted::boot(&s.w, 0, template, params, (&doc.0, &doc.1));

    // What the user data did on the instance, through the stubs and on its files.
    let calls = b.machine.stub_calls();
    let mut expected = vec![
        "systemctl start ecstasks.slice".to_owned(),
        "aws ssm get-parameter --region us-east-1 --name /ecsmesh/bundle.pem --query Parameter.Value --output text".into(),
        "docker login --username AWS --password-stdin 123456789012.dkr.ecr.us-east-1.amazonaws.com".into(),
        "systemctl start docker".into(),
        format!("docker pull {IMAGE}"),
    ];
    if daemon {
        expected.push("docker run --rm --network host --user 0 --cap-drop ALL".into());
    } else {
        expected.extend([
            format!("docker create {IMAGE}"),
            "docker cp".into(),
            "docker rm".into(),
            "systemctl daemon-reload".into(),
            "systemctl enable --now ecsmesh.service".into(),
        ]);
    }
    expected.push("systemctl enable --now --no-block ecs.service".into());
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    assert_calls_in_order(&calls, &expected);
    assert_eq!(
        calls.iter().any(|c| c.starts_with("docker run")),
        daemon,
        "{calls:?}"
    );
    // The other side of `| docker login` (either may log first).
    assert!(
        calls
            .iter()
            .any(|c| c == "aws ecr get-login-password --region us-east-1"),
        "{calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("dnf")),
        "the AMI has the AWS CLI: {calls:?}"
    );
    if daemon {
        let bootstrap = calls.iter().find(|c| c.contains(" bootstrap ")).unwrap();
        for flag in [
            "--cluster test",
            "--issuer-url https://issuer.mesh.local:8443",
            "--cloudmap-namespace mesh.local --cloudmap-service orders",
        ] {
            assert!(bootstrap.contains(flag), "{flag} in {bootstrap}");
        }
    } else {
        assert_eq!(
            b.machine.read("/etc/systemd/system/ecsmesh.service"),
            std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../deploy/ecsmesh.service"
            ))
            .unwrap(),
            "the unit comes out of the image"
        );
    }
    assert!(
        b.machine
            .read("/etc/ecs/ecs.config")
            .contains("ECS_CLUSTER=test\n"),
        "the agent joins the stack's cluster"
    );
    assert_eq!(
        b.machine.read("/etc/ecsmesh/bundle.pem").trim(),
        std::fs::read_to_string(s.w.ca_dir().join("bundle.pem"))
            .unwrap()
            .trim(),
        "the trust bundle from SSM"
    );
    let root = b.machine.root.display().to_string();
    assert!(
        b.machine
            .mountinfo()
            .lines()
            .any(|l| l.contains(&format!(" {root}/sys/fs/bpf ")) && l.contains(" - bpf ")),
        "the user data mounted a bpffs on /sys/fs/bpf:\n{}",
        b.machine.mountinfo()
    );

    // The config bootstrap wrote (from IMDS at its default address), with the paths the
    // node sees: in the daemon task, the host's cgroupfs is mounted at /host.
    let config = b.machine.read("/etc/ecsmesh/config.toml");
    let cgroupfs = if daemon {
        "/host/sys/fs/cgroup"
    } else {
        "/sys/fs/cgroup"
    };
    for line in [
        format!("instance = \"{}\"", s.ec2[0]),
        format!("cgroup_root = \"{cgroupfs}/ecstasks.slice\""),
        format!("cgroup_root = \"{cgroupfs}\""),
        "issuer_url = \"https://issuer.mesh.local:8443\"".into(),
        "imds_url = \"http://169.254.169.254\"".into(),
        "docker_socket = \"/var/run/docker.sock\"".into(),
        "publish_ready_attribute = true".into(),
        "services = [\"orders\"]".into(),
    ] {
        assert!(config.lines().any(|l| l == line), "{line} in:\n{config}");
    }
    if daemon {
        let (ok, out) = b.check_config("/etc/ecsmesh/config.toml");
        assert!(
            ok,
            "check-config in the daemon task refused the config:\n{out}"
        );
    } else {
        // The unit's ExecStart reads it on the host, with the binary copied there.
        let out = process::run(b.machine.command(
            &[
                "/usr/local/bin/ecsmesh",
                "check-config",
                "--config",
                "/etc/ecsmesh/config.toml",
            ],
            None,
        ));
        assert!(
            out.status.success(),
            "check-config on the host: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The node: the daemon service's task, or the unit, on this instance.
    serve_client_container(&b, &s.client.container);
    if daemon {
        b.start_daemon();
    } else {
        b.start_unit();
    }
    let inst0 = &s.w.instances[0];
    wait_for("the node is ready", Duration::from_secs(30), &mut b, |_| {
        matches!(inst0.netns.http_get(inst0.admin, "/ready"), Ok((200, _)))
    });
    let client_id = default_identity("client");
    wait_for(
        "the client task holds its identity from the issuer",
        Duration::from_secs(30),
        &mut b,
        |_| s.holds(0, &client_id),
    );
    // Health gating through the mounted docker.sock: Docker says the client's container
    // has no health check, so the task serves (a node that cannot ask Docker holds it).
    wait_for(
        "the client task serves (Docker inspected through the socket)",
        Duration::from_secs(15),
        &mut b,
        |_| {
            counter(
                &inst0.metrics(),
                "ecsmesh_ecs_tasks",
                &[("state", "serving")],
            ) == 1.0
        },
    );
    let m = inst0.metrics();
    assert_eq!(
        counter(
            &m,
            "ecsmesh_issuer_calls_total",
            &[("call", "attest"), ("result", "issued")]
        ),
        1.0,
        "the node attested once with its instance identity document"
    );

    // The task's traffic: redirected to the node, tunnelled with mTLS between the
    // issuer-named identities.
    assert_redirected(&s.call_orders(3), inst0.outbound_v4(Bridge));
    let hs = counter(
        &inst0.metrics(),
        "ecsmesh_tls_handshakes_total",
        &[
            ("role", "client"),
            ("source_identity", &client_id),
            ("destination_identity", &default_identity("orders")),
        ],
    );
    assert!(hs >= 1.0, "an mTLS handshake between the tasks' identities");

    // Ready published the placement attribute on this container instance (moto as ECS).
    let listed = s.moto.ecs(
        "ListAttributes",
        json!({ "cluster": CLUSTER, "targetType": "container-instance",
                "attributeName": "ecsmesh.ready", "attributeValue": "true" }),
    );
    let targets: Vec<&str> = listed["attributes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["targetId"].as_str())
        .collect();
    assert!(
        targets
            .iter()
            .any(|t| s.ci[0].ends_with(t) || *t == s.ci[0]),
        "ecsmesh.ready on {}: {listed}",
        s.ci[0]
    );
    b.assert_node_running();
}

/// A copy of the template with `from` (which must be there) replaced by `to`.
fn mutated_template(tag: &str, from: &str, to: &str) -> (TempDir, Template) {
    let good = std::fs::read_to_string(template_path()).unwrap();
    assert!(
        good.contains(from),
        "the template no longer has {from:?}: update this test"
    );
    let dir = TempDir::new(tag);
    let path = dir.0.join("cloudformation.yaml");
    std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
    let template = Template::load(&path);
    (dir, template)
}

#[test]
fn a_wrong_issuer_name_in_the_user_data_fails_attestation_naming_it() {
    let (_dir, template) = mutated_template(
        "wrong-issuer",
        "IssuerHost: !Sub ${IssuerDiscoveryService.Name}.${NamespaceName}",
        "IssuerHost: !Sub ecsmesh-${IssuerDiscoveryService.Name}.${NamespaceName}",
    );
    let params = stack(&template, "ecs-daemon");
    let s = stack_world(&params);
    let doc = s.documents[0].clone();
    let mut b = Booted::boot(&s.w, 0, template, params, (&doc.0, &doc.1));
    // The name is well formed: only a node that tries it finds out.
    let (ok, out) = b.check_config("/etc/ecsmesh/config.toml");
    assert!(ok, "{out}");
    serve_client_container(&b, &s.client.container);
    b.start_daemon();
    let wrong = "ecsmesh-issuer.mesh.local:8443";
    wait_for(
        "the node reports the failed attestation",
        Duration::from_secs(30),
        &mut b,
        |b| {
            b.node_log()
                .lines()
                .any(|l| l.contains("issuer unreachable for attest") && l.contains(wrong))
        },
    );
    let said = b.node_log();
    let said = said
        .lines()
        .find(|l| l.contains("issuer unreachable for attest") && l.contains(wrong))
        .unwrap();
    println!("the node said: {said}");
    assert!(!s.holds(0, &default_identity("client")));
    let m = s.w.instances[0].metrics();
    let attest = |result| {
        counter(
            &m,
            "ecsmesh_issuer_calls_total",
            &[("call", "attest"), ("result", result)],
        )
    };
    assert!(attest("unreachable") >= 1.0);
    assert_eq!(attest("issued"), 0.0);
}

#[test]
fn a_daemon_task_without_the_docker_socket_holds_its_tasks_saying_docker_failed() {
    let (_dir, template) = mutated_template(
        "no-docker-sock",
        "            - SourceVolume: docker-socket\n              ContainerPath: /var/run/docker.sock\n              ReadOnly: true\n",
        "",
    );
    let params = stack(&template, "ecs-daemon");
    let s = stack_world(&params);
    let doc = s.documents[0].clone();
    let mut b = Booted::boot(&s.w, 0, template, params, (&doc.0, &doc.1));
    serve_client_container(&b, &s.client.container);
    b.start_daemon();
    wait_for(
        "the node reports that it cannot ask Docker",
        Duration::from_secs(20),
        &mut b,
        |b| {
            b.node_log().lines().any(|l| {
                l.contains("docker inspect failed; health unknown")
                    && l.contains(&s.client.container)
            })
        },
    );
    let m = s.w.instances[0].metrics();
    assert_eq!(
        counter(&m, "ecsmesh_ecs_tasks", &[("state", "serving")]),
        0.0,
        "a task whose health nobody can check is held back"
    );
}

/// A booted single instance without the rest of the mesh (config-level checks).
fn boot_alone(launcher: &str, template_path: &Path) -> (World, Booted) {
    let mut w = World::new(tools(), 1);
    w.enable_issuer_mesh(TRUST_DOMAIN);
    let template = Template::load(template_path);
    let params = stack(&template, launcher);
    let doc = aws::identity_document("i-0b0071000000000aa");
    let sig = aws::sign_document(&doc);
    let b = Booted::boot(&w, 0, template, params, (&doc, &sig));
    (w, b)
}

#[test]
fn a_rendered_config_without_identity_is_refused_by_check_config() {
    let (_w, b) = boot_alone("ecs-daemon", &template_path());
    let config = b.machine.read("/etc/ecsmesh/config.toml");
    let (ok, out) = b.check_config("/etc/ecsmesh/config.toml");
    assert!(ok, "{out}");
    // The same config with its [identity] table cut out (a copy on the instance).
    let mut skipping = false;
    let broken: String = config
        .lines()
        .filter(|l| {
            if l.starts_with('[') {
                skipping = *l == "[identity]";
            }
            !skipping
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!broken.contains("issuer_url"), "{broken}");
    std::fs::write(b.machine.path("/etc/ecsmesh/no-identity.toml"), &broken).unwrap();
    let (ok, out) = b.check_config("/etc/ecsmesh/no-identity.toml");
    assert!(
        !ok,
        "check-config accepted a node config without [identity]:\n{broken}"
    );
    assert!(
        out.contains("[identity]"),
        "the refusal does not say [identity] is missing: {out}"
    );
}

// The sidecar's container command (issue 15 item 4, its second half).

fn sidecar_task_definition_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/task-definition-sidecar.json"
    ))
}

fn sidecar_task_definition() -> Value {
    let path = sidecar_task_definition_path();
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Where the ECS agent answers a task's containers: task metadata (v4) and the task
/// role's credentials.
const ECS_AGENT_ENDPOINT: &str = "169.254.170.2:80";

/// The agent's task endpoint on instance `i`: 169.254.170.2 on the loopback of the
/// instance's netns (which the task's pause container holds here, see [`SidecarTask`]).
fn task_endpoint(w: &World, i: usize) -> HttpFixture {
    let netns = &w.instances[i].netns;
    netns.ip(&["addr", "add", "169.254.170.2/32", "dev", "lo"]);
    HttpFixture::tcp_in(netns, ECS_AGENT_ENDPOINT.parse().unwrap())
}

/// One task of `deploy/task-definition-sidecar.json` (`awsvpc`) on a booted instance, as
/// the ECS agent runs it: first a pause container holding the task's network namespace,
/// then the `ecsmesh` container through the `docker run` emulation with the definition's
/// user, capabilities, ulimits, read-only root, environment, mounts and command, in
/// `--network container:<pause>`, in a container cgroup of its own below the task's
/// `ecstasks.slice/ecstasks-<id>.slice`, with what the agent adds to the environment
/// (the task metadata and credential endpoints) and the task-scoped `run` volume (an
/// empty directory of the task's own).
///
/// The task's netns is the instance's: the world's tasks live in their instance's netns
/// (the client's app container, meshtool, runs there, in its cgroup below the same task
/// slice), and no node proxy runs on this instance, so the sidecar's loopback ports
/// (15000, 15001) are free. A netns of its own would add an ENI's addressing and routes
/// to the test, not a different path through the sidecar: the redirect is by cgroup.
///
/// Drop: SIGTERM, then (as the agent after `stopTimeout`) SIGKILL; then the pause
/// container; the task's pins are removed in the instance if the sidecar left any.
struct SidecarTask {
    def: Value,
    id: String,
    /// The task's slice (host path) and the `ecsmesh` container's cgroup below it.
    slice: PathBuf,
    cgroup: PathBuf,
    pause_name: String,
    pause: Option<Proc>,
    sidecar: Option<Proc>,
    log: PathBuf,
    env: Vec<(String, String)>,
    /// The task-scoped `run` volume as the instance sees it.
    run_volume: String,
    /// `ecsmesh uninstall` of the task's pin directory in the instance.
    uninstall: Option<std::process::Command>,
}

impl SidecarTask {
    /// `def`'s task for `task` (its ARN, family, app container's cgroup) on booted
    /// instance `i`; the agent's endpoint `agent` serves its metadata and `creds` (a
    /// session of `role`, named after the task id, as the agent assumes the task role).
    /// `stand_ins`: environment standing in for AWS (moto as every endpoint).
    fn new(
        b: &Booted,
        def: Value,
        task: &EcsTask,
        agent: &HttpFixture,
        role: &str,
        creds: &harness::aws::RoleCredentials,
        stand_ins: &[(&str, String)],
    ) -> SidecarTask {
        assert_eq!(def["networkMode"], "awsvpc", "the sidecar task is awsvpc");
        let id = task.id.clone();
        let containers: Vec<Value> = def["containerDefinitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| json!({ "DockerId": format!("{}-{}", c["name"].as_str().unwrap(), id), "Name": c["name"], "Type": "NORMAL" }))
            .collect();
        agent.set(
            &format!("/v4/{id}/task"),
            200,
            json!({ "Cluster": format!("arn:aws:ecs:{REGION}:123456789012:cluster/{CLUSTER}"),
                    "TaskARN": task.arn, "Family": task.family, "Revision": "1",
                    "DesiredStatus": "RUNNING", "KnownStatus": "RUNNING",
                    "Containers": containers })
            .to_string(),
        );
        agent.set(
            &format!("/v2/credentials/{id}"),
            200,
            creds.container_json(&role_arn(role)),
        );
        let mut env = vec![
            (
                "ECS_CONTAINER_METADATA_URI_V4".to_owned(),
                format!("http://169.254.170.2/v4/{id}"),
            ),
            (
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI".to_owned(),
                format!("/v2/credentials/{id}"),
            ),
            ("AWS_EXECUTION_ENV".to_owned(), "AWS_ECS_EC2".to_owned()),
        ];
        env.extend(stand_ins.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let slice = task.cgroup.parent().unwrap().to_path_buf();
        let short: String = id.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        let cgroup = slice.join(format!("docker-{short}ec5e.scope"));
        std::fs::create_dir_all(&cgroup).unwrap();
        let pause_name = format!("ecs-{}-1-internalecspause-{short}", task.family);
        let pause_cgroup = slice.join(format!("docker-{short}a05e.scope"));
        std::fs::create_dir_all(&pause_cgroup).unwrap();
        let pause = b.machine.start_pause(&pause_name, &pause_cgroup);
        let run_volume = format!(
            "/var/lib/docker/volumes/ecs-{}-1-run-{short}/_data",
            task.family
        );
        std::fs::create_dir_all(b.machine.path(&run_volume)).unwrap();
        let uninstall = b.machine.command(
            &[
                "/opt/ecsmesh-test/image/usr/local/bin/ecsmesh",
                "uninstall",
                "--pin-dir",
                &format!("/sys/fs/bpf/ecsmesh-sidecars/{id}"),
            ],
            None,
        );
        SidecarTask {
            def,
            // Beside the node's log, in the world's workdir.
            log: b.node_log.with_file_name(format!("sidecar-task-{id}.log")),
            id,
            slice,
            cgroup,
            pause_name,
            pause: Some(pause),
            sidecar: None,
            env,
            run_volume,
            uninstall: Some(uninstall),
        }
    }

    /// `docker run` of the `ecsmesh` container (with `command` instead of the
    /// definition's when given).
    fn docker_run(&self, b: &Booted, command: Option<&[&str]>) -> std::process::Command {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let volumes = [("run".to_owned(), self.run_volume.clone())].into();
        let args = ecs_docker_run_args(
            &self.def,
            "ecsmesh",
            &format!("container:{}", self.pause_name),
            IMAGE,
            &volumes,
            &env,
            command,
        );
        let mut argv = vec!["docker"];
        argv.extend(args.iter().map(String::as_str));
        b.machine.command(&argv, Some(&self.cgroup))
    }

    /// Runs the container to its end, bounded: (succeeded, its output).
    fn run_to_end(&self, b: &Booted, command: Option<&[&str]>) -> (bool, String) {
        let log = self.log.with_extension("run.log");
        let mut p = process::spawn_logged(self.docker_run(b, command), "ecsmesh container", &log);
        let st = p.wait_timeout(Duration::from_secs(30));
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        match st {
            Some(st) => (st.success(), format!("{st}\n{out}")),
            None => {
                p.signal(nix::sys::signal::Signal::SIGKILL);
                let _ = p.wait_timeout(Duration::from_secs(5));
                (false, format!("still running after 30 s\n{out}"))
            }
        }
    }

    fn start(&mut self, b: &Booted) {
        let cmd = self.docker_run(b, None);
        self.sidecar = Some(process::spawn_logged(
            cmd,
            "ecsmesh sidecar container",
            &self.log,
        ));
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(p) = self.sidecar.as_mut()
            && let Ok(Some(st)) = p.child.try_wait()
        {
            panic!("the sidecar container exited ({st}):\n{}", self.log());
        }
    }

    /// As ECS stops the task's last container: SIGTERM, SIGKILL after `stopTimeout`.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut p = self.sidecar.take()?;
        let grace = self.def["containerDefinitions"][0]["stopTimeout"]
            .as_u64()
            .unwrap_or(30);
        p.signal(nix::sys::signal::Signal::SIGTERM);
        let st = p.wait_timeout(Duration::from_secs(grace));
        if st.is_none() {
            p.signal(nix::sys::signal::Signal::SIGKILL);
            let _ = p.wait_timeout(Duration::from_secs(5));
        }
        st
    }
}

impl Drop for SidecarTask {
    fn drop(&mut self) {
        let _ = self.stop();
        if let Some(mut p) = self.pause.take() {
            p.signal(nix::sys::signal::Signal::SIGKILL);
            let _ = p.wait_timeout(Duration::from_secs(5));
        }
        if let Some(cmd) = self.uninstall.take() {
            let _ = process::run(cmd);
        }
    }
}

/// The `ecsmesh` container command reads this, written by the user data.
const SIDECAR_CONFIG: &str = "/etc/ecsmesh/sidecar.toml";

/// The stack (daemon launcher) boots instance 0; its user data writes the instance's
/// shared sidecar config, which `check-config` in the sidecar container accepts. Then the
/// client task runs as a task of `deploy/task-definition-sidecar.json` on it (see
/// [`SidecarTask`]): its sidecar learns the task from the fixture task metadata endpoint,
/// proves it to the issuer with the task role's credentials (moto-STS with authentication
/// checks the signature), is ready by the definition's own health check, and carries the
/// task's app traffic (redirected at the task's cgroup) over mTLS to orders, whose node
/// (instance 1) terminates it. SIGTERM takes its programs and pins along.
#[test]
fn sidecar_task_on_a_booted_instance_proves_its_task_role_and_meshes() {
    let template = Template::load(&template_path());
    let params = stack(&template, "ecs-daemon");
    let (s, roles): (Issued, TaskRoles) = stack_world_with(&params, |s| s.enable_task_roles());
    let doc = s.documents[0].clone();
    let mut b = Booted::boot(&s.w, 0, template, params, (&doc.0, &doc.1));

    // The user data wrote the sidecars' config next to the node's.
    let calls = b.machine.stub_calls();
    let bootstrap = calls.iter().find(|c| c.contains(" bootstrap ")).unwrap();
    assert!(
        bootstrap.contains(&format!("--sidecar-out {SIDECAR_CONFIG}")),
        "{bootstrap}"
    );
    let config = b.machine.read(SIDECAR_CONFIG);
    for line in [
        format!("instance = \"{}\"", s.ec2[0]),
        "cluster = \"test\"".to_owned(),
        "cgroup_root = \"/host/sys/fs/cgroup\"".into(),
        "pin_dir = \"/sys/fs/bpf/ecsmesh-sidecars\"".into(),
        "issuer_url = \"https://issuer.mesh.local:8443\"".into(),
        "attestation = \"task_role\"".into(),
        format!("region = \"{REGION}\""),
        "bundle = \"/etc/ecsmesh/bundle.pem\"".into(),
        "services = [\"orders\"]".into(),
    ] {
        assert!(config.lines().any(|l| l == line), "{line} in:\n{config}");
    }
    assert!(
        !config.contains("[ecs]"),
        "a sidecar serves its own task:\n{config}"
    );

    let agent = task_endpoint(&s.w, 0);
    // What stands in for AWS: moto as Cloud Map (the SDK's endpoint variable; the task
    // role's credentials come from the agent's endpoint), and moto-STS as the region's
    // STS, which the signed request names: the one line the test adds to the config.
    let stand_ins = [(
        "AWS_ENDPOINT_URL",
        format!("http://{ISSUER_IP}:{}", aws::MOTO_PORT),
    )];
    let mut task = SidecarTask::new(
        &b,
        sidecar_task_definition(),
        &s.client,
        &agent,
        "client-app",
        &roles.client,
        &stand_ins,
    );
    let (ok, out) = task.run_to_end(&b, Some(&["check-config", "--config", SIDECAR_CONFIG]));
    assert!(
        ok,
        "check-config in the sidecar container refused {SIDECAR_CONFIG}:\n{out}"
    );
    let with_sts = config.replacen(
        "[identity]\n",
        &format!("[identity]\nsts_url = \"{STS_URL}\"\n"),
        1,
    );
    assert_ne!(with_sts, config, "[identity] in:\n{config}");
    std::fs::write(b.machine.path(SIDECAR_CONFIG), with_sts).unwrap();

    serve_client_container(&b, &s.client.container);
    task.start(&b);
    let inst0 = &s.w.instances[0];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(inst0.netns.http_get(inst0.admin, "/ready"), Ok((200, _))) {
        task.assert_running();
        assert!(
            Instant::now() < deadline,
            "the sidecar is not ready in 30 s:\n{}",
            task.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The task definition's own health check (ECS runs it in the container; its netns is
    // the task's): what the app container waits for (dependsOn HEALTHY).
    let check: Vec<String> = task.def["containerDefinitions"][0]["healthCheck"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(check[0], "CMD");
    let argv: Vec<&str> = check[1..].iter().map(String::as_str).collect();
    let out = process::run(b.machine.command(&argv, Some(&task.cgroup)));
    assert!(
        out.status.success(),
        "the health check failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let client_id = default_identity("client");
    assert!(
        s.holds(0, &client_id),
        "the sidecar holds {client_id}:\n{}",
        task.log()
    );
    let m = s.issuer_metrics();
    assert_eq!(
        counter(
            &m,
            "ecsmesh_issuer_requests_total",
            &[("endpoint", "task"), ("result", "issued")]
        ),
        1.0,
        "the sidecar proved its task with the task role once"
    );
    let pins = b
        .machine
        .ns_path(&format!("/sys/fs/bpf/ecsmesh-sidecars/{}", task.id));
    assert!(pins.is_dir(), "{} pinned", pins.display());
    assert!(
        !harness::cgroup_prog_ids(&task.slice).is_empty(),
        "the redirect is attached at the task's cgroup {}",
        task.slice.display()
    );

    // The app container (meshtool in the client's cgroup, a sibling below the task's
    // slice) calls orders: redirected into the sidecar on loopback, tunnelled with mTLS
    // to the orders node on instance 1.
    let reports = s.call_orders(3);
    assert_redirected(&reports, "127.0.0.1:15001".parse().unwrap());
    let hs = counter(
        &inst0.metrics(),
        "ecsmesh_tls_handshakes_total",
        &[
            ("role", "client"),
            ("source_identity", &client_id),
            ("destination_identity", &default_identity("orders")),
        ],
    );
    assert!(hs >= 1.0, "an mTLS handshake between the tasks' identities");
    let inbound = counter(
        &s.w.instances[1].metrics(),
        "ecsmesh_tunnel_inbound_streams_total",
        &[
            ("source_identity", &client_id),
            ("destination_family", "orders"),
        ],
    );
    assert_eq!(inbound, 3.0, "the orders node terminated the three streams");

    // The task stops: the sidecar takes its programs and pins along.
    let st = task
        .stop()
        .expect("the sidecar exits on SIGTERM within stopTimeout");
    assert!(st.success(), "{st}: {}", task.log());
    assert!(!pins.exists(), "{} removed: {}", pins.display(), task.log());
    assert!(
        harness::cgroup_prog_ids(&task.slice).is_empty(),
        "nothing left attached to the task's cgroup"
    );
    b.assert_node_running();
}

/// A task of `family` on instance 0 of a [`boot_alone`] world, placed as the agent
/// would (ECS task ids are 32 hex digits: one `ecstasks-<id>.slice`), with a session
/// nobody checks (no issuer here) and the agent's endpoint serving it.
fn lone_sidecar_task(
    w: &World,
    b: &Booted,
    def: Value,
    family: &str,
) -> (HttpFixture, SidecarTask) {
    let id = harness::uid()
        .chars()
        .chain(std::iter::repeat('0'))
        .filter(|c| c.is_ascii_hexdigit())
        .take(32)
        .collect::<String>();
    let container = format!("{id}{id}");
    let task = EcsTask {
        arn: format!("arn:aws:ecs:{REGION}:123456789012:task/{CLUSTER}/{id}"),
        family: family.to_owned(),
        cgroup: w.cgroups.dir(&format!(
            "{}/ecstasks.slice/ecstasks-{id}.slice/docker-{container}.scope",
            w.instances[0].name
        )),
        id,
        container,
    };
    let agent = task_endpoint(w, 0);
    let creds = harness::aws::RoleCredentials {
        access_key_id: "ASIAUNCHECKED".into(),
        secret_access_key: "unchecked".into(),
        session_token: "unchecked".into(),
    };
    let t = SidecarTask::new(b, def, &task, &agent, "client-app", &creds, &[]);
    (agent, t)
}

#[test]
fn user_data_without_sidecar_out_fails_the_sidecar_naming_its_config() {
    let (dir, _) = mutated_template(
        "no-sidecar-out",
        " --sidecar-out /etc/ecsmesh/sidecar.toml",
        "",
    );
    let (w, b) = boot_alone("ecs-daemon", &dir.0.join("cloudformation.yaml"));
    assert!(b.machine.path("/etc/ecsmesh/config.toml").is_file());
    assert!(!b.machine.path(SIDECAR_CONFIG).exists());
    let (_agent, task) = lone_sidecar_task(&w, &b, sidecar_task_definition(), "client");
    let (ok, out) = task.run_to_end(&b, None);
    assert!(!ok, "the sidecar ran without {SIDECAR_CONFIG}:\n{out}");
    let said = out
        .lines()
        .find(|l| l.contains("ecsmesh: error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{out}"));
    println!("the sidecar said: {said}");
    assert!(said.contains(SIDECAR_CONFIG), "{said}");
}

#[test]
fn a_sidecar_task_without_the_host_cgroup_mount_fails_naming_the_cgroup_root() {
    let mut def = sidecar_task_definition();
    let mounts = def["containerDefinitions"][0]["mountPoints"]
        .as_array_mut()
        .unwrap();
    let before = mounts.len();
    mounts.retain(|m| m["sourceVolume"] != "host-cgroup");
    assert_eq!(
        mounts.len(),
        before - 1,
        "the definition mounts host-cgroup: update this test"
    );
    let (w, b) = boot_alone("ecs-daemon", &template_path());
    let (_agent, task) = lone_sidecar_task(&w, &b, def, "client");
    let (ok, out) = task.run_to_end(&b, None);
    assert!(
        !ok,
        "the sidecar ran without the host's cgroup filesystem:\n{out}"
    );
    let said = out
        .lines()
        .find(|l| l.contains("ecsmesh: error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{out}"));
    println!("the sidecar said: {said}");
    // The config's cgroup_root, where the definition no longer mounts anything, is
    // checked before the task's cgroup below it.
    assert!(
        said.contains(&format!(
            "{SIDECAR_CONFIG}: cgroup_root: /host/sys/fs/cgroup:"
        )),
        "{said}"
    );
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ecsmesh-boot-{tag}-{}", harness::uid()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
