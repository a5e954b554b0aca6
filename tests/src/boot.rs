//! Booting a container instance the way `deploy/cloudformation.yaml` does, on the harness.
//!
//! - [`Template`]: the CloudFormation template as data (parsed by `deploy/check.py`'s
//!   loader, the one `cargo xtask deploy-check` uses, so `!Sub`/`!Ref` tags come out as
//!   `Fn::Sub`/`Ref`), and the few intrinsic functions the launch template's user data and
//!   the daemon task definition use, evaluated with a test stack's parameters. The user
//!   data the test runs is the template's, rendered, never a copy.
//! - [`Machine`]: an emulated instance root filesystem in a private mount namespace of the
//!   test's own, so the user data's writes (`/etc/ecs`, `/etc/ecsmesh`, a bpffs on
//!   `/sys/fs/bpf`, `/usr/local`, …) land in a temporary directory and never on the real
//!   host. Its `/usr` is the host's (read-only); its `/sys/fs/cgroup` is a cgroup2 mount
//!   in a cgroup namespace rooted at the simulated instance's cgroup directory, so the
//!   instance's processes see that directory as the host's cgroup root, as on a real
//!   instance; its network is the instance's netns. Nothing else of the host is visible.
//!   Stubs for `systemctl`, `docker`, `aws` and `dnf` come first on its PATH and log
//!   their argv. The `docker` stub emulates `docker run` closely enough to run the real
//!   `ecsmesh` binary as the image would: a fresh root with the host's `/usr` and the
//!   image's `/usr/local`, a private cgroup namespace with its own `/sys/fs/cgroup`, only
//!   the `-v` mounts given, the capabilities `--cap-drop`/`--cap-add` leave, `--user`,
//!   `--read-only`, `--ulimit`, `-e`; host networking, or `--network container:<name>`
//!   joining a pause container's netns ([`Machine::start_pause`], an `awsvpc` task).
use std::{
    collections::BTreeMap,
    io::Read,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::process::{self, Placement, Proc};

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(format!("{}/../{rel}", env!("CARGO_MANIFEST_DIR")))
}

/// `deploy/cloudformation.yaml` (or a mutated copy of it) as JSON.
pub struct Template {
    pub doc: Value,
}

/// Values of a test stack: parameters and pseudo parameters (`AWS::Region`, …) by name.
pub type StackParams = BTreeMap<String, Value>;

impl Template {
    /// Parses `path` with `deploy/check.py`'s CloudFormation YAML loader (the project's
    /// venv, made by `cargo xtask deploy-check`, has PyYAML).
    pub fn load(path: &Path) -> Template {
        let python = repo_path("target/pyenv/bin/python");
        assert!(
            python.is_file(),
            "{}: run `cargo xtask deploy-check` first (creates target/pyenv)",
            python.display()
        );
        let out = Command::new(&python)
            .arg("-c")
            .arg(
                "import json, sys\nsys.path.insert(0, sys.argv[1])\nimport check\n\
                 print(json.dumps(check.load_yaml(__import__('pathlib').Path(sys.argv[2]))))",
            )
            .arg(repo_path("deploy"))
            .arg(path)
            .output()
            .expect("run the venv's python");
        assert!(
            out.status.success(),
            "parsing {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Template {
            doc: serde_json::from_slice(&out.stdout).expect("template as JSON"),
        }
    }

    pub fn resource(&self, name: &str) -> &Value {
        let r = &self.doc["Resources"][name];
        assert!(r.is_object(), "the template has no resource {name}");
        r
    }

    /// The stack's parameters: each template parameter's `Default`, overridden by
    /// `given` (which may add pseudo parameters, `AWS::Region`, …, and must not name a
    /// parameter the template lacks). One with neither is left out: a `Ref` to it fails,
    /// naming it.
    pub fn params(&self, given: &[(&str, Value)]) -> StackParams {
        let mut out = StackParams::new();
        let declared = self.doc["Parameters"]
            .as_object()
            .expect("template Parameters");
        for (name, p) in declared {
            if let Some(v) = given.iter().find(|(n, _)| n == name).map(|(_, v)| v) {
                out.insert(name.clone(), v.clone());
            } else if let Some(d) = p.get("Default") {
                let d = match (p["Type"].as_str(), d) {
                    (Some("CommaDelimitedList"), Value::String(s)) => {
                        Value::Array(s.split(',').map(|x| Value::String(x.into())).collect())
                    }
                    _ => d.clone(),
                };
                out.insert(name.clone(), d);
            }
        }
        for (name, v) in given {
            if name.starts_with("AWS::") {
                out.insert((*name).to_owned(), v.clone());
            } else {
                assert!(
                    declared.contains_key(*name),
                    "the template has no parameter {name}"
                );
            }
        }
        out
    }

    /// The launch template's user data (`Fn::Base64` of `Fn::Sub`), rendered.
    pub fn user_data(&self, params: &StackParams) -> Result<String, String> {
        let ud = &self.resource("LaunchTemplate")["Properties"]["LaunchTemplateData"]["UserData"];
        let body = ud
            .get("Fn::Base64")
            .ok_or("LaunchTemplate UserData is not Fn::Base64")?;
        if body.get("Fn::Sub").is_none() {
            return Err(format!(
                "UserData: expected Fn::Base64 of Fn::Sub, got {body}"
            ));
        }
        self.eval_str(body, params, &BTreeMap::new())
    }

    /// Evaluates an intrinsic function to a string (a list, such as a
    /// `CommaDelimitedList` parameter, only through `Fn::Join`, as in CloudFormation).
    pub fn eval_str(
        &self,
        v: &Value,
        params: &StackParams,
        vars: &BTreeMap<String, String>,
    ) -> Result<String, String> {
        match self.eval(v, params, vars)? {
            Value::String(s) => Ok(s),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(format!("{v} is not a string: {other}")),
        }
    }

    /// The intrinsic functions the user data and the daemon task definition use: `Ref`
    /// (parameters, pseudo parameters, the ECS cluster), `Fn::GetAtt` (a Cloud Map
    /// service's `Name`), `Fn::Sub`, `Fn::Join`. Anything else fails, naming it.
    pub fn eval(
        &self,
        v: &Value,
        params: &StackParams,
        vars: &BTreeMap<String, String>,
    ) -> Result<Value, String> {
        let Some(obj) = v.as_object().filter(|o| o.len() == 1) else {
            return match v {
                Value::Object(_) => Err(format!("not an intrinsic function: {v}")),
                other => Ok(other.clone()),
            };
        };
        let (f, arg) = obj.iter().next().unwrap();
        match f.as_str() {
            "Ref" => {
                let name = arg.as_str().ok_or("Ref of a non-string")?;
                self.reference(name, params)
            }
            "Fn::GetAtt" => {
                let parts: Vec<&str> = arg
                    .as_array()
                    .ok_or("Fn::GetAtt of a non-list")?
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                self.get_att(&parts.join("."), params)
            }
            "Fn::Join" => {
                let sep = arg[0].as_str().ok_or("Fn::Join separator")?;
                let list = match self.eval(&arg[1], params, vars)? {
                    Value::Array(items) => items,
                    other => return Err(format!("Fn::Join of a non-list: {other}")),
                };
                let items: Result<Vec<String>, String> = list
                    .iter()
                    .map(|i| self.eval_str(i, params, vars))
                    .collect();
                Ok(Value::String(items?.join(sep)))
            }
            "Fn::Sub" => {
                let (text, own) = match arg {
                    Value::String(s) => (s.as_str(), None),
                    Value::Array(a) => (
                        a[0].as_str().ok_or("Fn::Sub text")?,
                        a.get(1).and_then(Value::as_object),
                    ),
                    other => return Err(format!("Fn::Sub of {other}")),
                };
                let mut scope = vars.clone();
                for (k, e) in own.into_iter().flatten() {
                    scope.insert(k.clone(), self.eval_str(e, params, vars)?);
                }
                sub(text, |name| {
                    if let Some(v) = scope.get(name) {
                        return Ok(v.clone());
                    }
                    let v = match name.split_once('.') {
                        Some(_) if !name.starts_with("AWS::") => self.get_att(name, params)?,
                        _ => self.reference(name, params)?,
                    };
                    match v {
                        Value::String(s) => Ok(s),
                        other => Err(format!("${{{name}}} is not a string: {other}")),
                    }
                })
                .map(Value::String)
            }
            other => Err(format!("intrinsic function {other} is not emulated")),
        }
    }

    fn reference(&self, name: &str, params: &StackParams) -> Result<Value, String> {
        if let Some(v) = params.get(name) {
            return Ok(v.clone());
        }
        let r = &self.doc["Resources"][name];
        match r["Type"].as_str() {
            // Ref of a cluster is its name.
            Some("AWS::ECS::Cluster") => {
                self.eval(&r["Properties"]["ClusterName"], params, &BTreeMap::new())
            }
            Some(t) => Err(format!("Ref {name} ({t}) has no test value")),
            None => Err(format!(
                "Ref {name}: no such parameter or resource, and no test value"
            )),
        }
    }

    fn get_att(&self, dotted: &str, params: &StackParams) -> Result<Value, String> {
        let (res, att) = dotted
            .split_once('.')
            .ok_or("Fn::GetAtt without attribute")?;
        let r = &self.doc["Resources"][res];
        match (r["Type"].as_str(), att) {
            (Some("AWS::ServiceDiscovery::Service"), "Name") => {
                self.eval(&r["Properties"]["Name"], params, &BTreeMap::new())
            }
            _ => Err(format!("Fn::GetAtt {dotted} has no test value")),
        }
    }
}

/// `Fn::Sub` substitution: `${Name}` from `lookup`, `${!Literal}` as `${Literal}`.
pub fn sub(
    text: &str,
    mut lookup: impl FnMut(&str) -> Result<String, String>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated ${{ in Fn::Sub: {}", &rest[at..]))?;
        let name = &after[..end];
        match name.strip_prefix('!') {
            Some(lit) => {
                out.push_str("${");
                out.push_str(lit);
                out.push('}');
            }
            None => out.push_str(&lookup(name)?),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The `docker run` flags of a container definition that both shapes share: user,
/// capabilities, ulimits, read-only root, environment (then `extra_env`). `key` turns the
/// ECS API's field name (`linuxParameters`) into the shape's (CloudFormation:
/// `LinuxParameters`); `s` reads a value as a string.
fn container_flags(
    c: &Value,
    key: &dyn Fn(&str) -> String,
    s: &dyn Fn(&Value) -> String,
    extra_env: &[(&str, &str)],
) -> Vec<String> {
    let f = |v: &Value, k: &str| v[key(k).as_str()].clone();
    let list = |v: Value| v.as_array().cloned().unwrap_or_default();
    let mut a: Vec<String> = Vec::new();
    if let Some(u) = c.get(key("user").as_str()) {
        a.extend(["--user".into(), s(u)]);
    }
    let caps = f(&f(c, "linuxParameters"), "capabilities");
    for cap in list(f(&caps, "drop")) {
        a.extend(["--cap-drop".into(), s(&cap)]);
    }
    for cap in list(f(&caps, "add")) {
        a.extend(["--cap-add".into(), s(&cap)]);
    }
    for u in list(f(c, "ulimits")) {
        let limit = format!(
            "{}={}:{}",
            s(&f(&u, "name")),
            f(&u, "softLimit"),
            f(&u, "hardLimit")
        );
        a.extend(["--ulimit".into(), limit]);
    }
    if f(c, "readonlyRootFilesystem") == true {
        a.push("--read-only".into());
    }
    for e in list(f(c, "environment")) {
        a.extend([
            "-e".into(),
            format!("{}={}", s(&f(&e, "name")), s(&f(&e, "value"))),
        ]);
    }
    for (k, v) in extra_env {
        a.extend(["-e".into(), format!("{k}={v}")]);
    }
    a
}

/// `linuxParameters` → `LinuxParameters` (CloudFormation's field names).
fn capitalised(k: &str) -> String {
    let mut c = k.chars();
    c.next()
        .map(|first| first.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

/// `docker run` arguments for the first container of an ECS task definition (the
/// CloudFormation resource's properties), as the ECS agent would start it: network and
/// pid mode, user, capabilities, ulimits, read-only root, environment (`extra_env` added,
/// standing in for what the agent adds, like credentials), mounts, image, command
/// (`command` instead of the definition's when given).
pub fn docker_run_args(
    template: &Template,
    resource: &str,
    params: &StackParams,
    extra_env: &[(&str, &str)],
    command: Option<&[&str]>,
) -> Vec<String> {
    let none = BTreeMap::new();
    let props = &template.resource(resource)["Properties"];
    let c = &props["ContainerDefinitions"][0];
    let s = |v: &Value| {
        template
            .eval_str(v, params, &none)
            .unwrap_or_else(|e| panic!("{resource}: {e}"))
    };
    let mut a: Vec<String> = vec!["run".into(), "--rm".into()];
    if let Some(m) = props["NetworkMode"].as_str() {
        a.extend(["--network".into(), m.to_owned()]);
    }
    if let Some(m) = props["PidMode"].as_str() {
        a.extend(["--pid".into(), m.to_owned()]);
    }
    a.extend(container_flags(c, &capitalised, &s, extra_env));
    let volumes: BTreeMap<String, String> = props["Volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (s(&v["Name"]), s(&v["Host"]["SourcePath"])))
        .collect();
    for m in c["MountPoints"].as_array().into_iter().flatten() {
        let name = s(&m["SourceVolume"]);
        let src = volumes
            .get(&name)
            .unwrap_or_else(|| panic!("{resource}: mount of an unknown volume {name}"));
        let ro = if m["ReadOnly"] == true { ":ro" } else { "" };
        a.extend(["-v".into(), format!("{src}:{}{ro}", s(&m["ContainerPath"]))]);
    }
    a.push(s(&c["Image"]));
    match command {
        Some(cmd) => a.extend(cmd.iter().map(|x| (*x).to_owned())),
        None => a.extend(c["Command"].as_array().into_iter().flatten().map(s)),
    }
    a
}

/// `docker run` arguments for container `container` of an ECS task definition in the ECS
/// API's shape (`deploy/task-definition-*.json`), as the ECS agent would start it: user,
/// capabilities, ulimits, read-only root, environment (`extra_env` added: what the agent
/// adds, like the metadata and credential endpoints), mounts, command (`command` instead
/// of the definition's when given). What the agent decides, not the definition, is given:
/// `network` (`container:<pause>` for an `awsvpc` task: every container joins the pause
/// container's netns), `image` (the definition's is a placeholder the user replaces), and
/// where each task-scoped volume (one without `host`) lives on the instance.
pub fn ecs_docker_run_args(
    def: &Value,
    container: &str,
    network: &str,
    image: &str,
    task_volumes: &BTreeMap<String, String>,
    extra_env: &[(&str, &str)],
    command: Option<&[&str]>,
) -> Vec<String> {
    let c = def["containerDefinitions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == container)
        .unwrap_or_else(|| panic!("the task definition has no container {container}"));
    let s = |v: &Value| -> String {
        match v {
            Value::String(x) => x.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("{container}: {other} is not a string"),
        }
    };
    let mut a: Vec<String> = vec![
        "run".into(),
        "--rm".into(),
        "--network".into(),
        network.into(),
    ];
    a.extend(container_flags(c, &|k: &str| k.to_owned(), &s, extra_env));
    for m in c["mountPoints"].as_array().into_iter().flatten() {
        let name = s(&m["sourceVolume"]);
        let vol = def["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{container}: mount of an unknown volume {name}"));
        let src = match vol["host"]["sourcePath"].as_str() {
            Some(p) => p.to_owned(),
            None => task_volumes
                .get(&name)
                .unwrap_or_else(|| panic!("task-scoped volume {name}: no place given"))
                .clone(),
        };
        let ro = if m["readOnly"] == true { ":ro" } else { "" };
        a.extend(["-v".into(), format!("{src}:{}{ro}", s(&m["containerPath"]))]);
    }
    a.push(image.to_owned());
    match command {
        Some(cmd) => a.extend(cmd.iter().map(|x| (*x).to_owned())),
        None => a.extend(c["command"].as_array().into_iter().flatten().map(s)),
    }
    a
}

/// What the emulated instance is given beyond the host's `/usr`.
pub struct MachineSpec<'a> {
    /// The instance's netns file (`/run/netns/…`).
    pub netns: PathBuf,
    /// The instance's cgroup directory: its `/sys/fs/cgroup` (its cgroup namespace's root).
    pub cgroup_root: PathBuf,
    /// Where the machine's own processes (the user data, the stubs) run.
    pub boot_cgroup: PathBuf,
    /// An empty directory that becomes the instance's `/`.
    pub root: PathBuf,
    /// The `ecsmesh` binary the image (`image_uri`) holds.
    pub ecsmesh: &'a Path,
    pub image_uri: &'a str,
    /// `/etc/hosts` (the VPC resolver's answers, e.g. Cloud Map A records).
    pub hosts: &'a str,
    /// SSM parameters `aws ssm get-parameter` answers: (name, value).
    pub ssm: &'a [(&'a str, &'a str)],
    pub region: &'a str,
}

/// The emulated instance (see the module doc); its mount namespace lives until drop.
pub struct Machine {
    pub root: PathBuf,
    netns: PathBuf,
    boot_cgroup: PathBuf,
    holder: Option<Proc>,
}

/// Where the stubs and the test's files live inside the instance root.
const TEST_DIR: &str = "/opt/ecsmesh-test";
/// The stubs' argv log inside the instance root.
pub const STUB_LOG: &str = "/var/log/ecsmesh-test-stubs.log";
/// The instance's PATH with the stubs first.
const PATH: &str =
    "/opt/ecsmesh-test/stubs:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Machine {
    pub fn new(spec: &MachineSpec<'_>) -> Machine {
        let root = spec.root.clone();
        let mk = |rel: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
            p
        };
        for d in [
            "usr",
            "dev",
            "proc",
            "sys",
            "etc/ecs",
            "etc/systemd/system",
            "var/lib",
            "var/log",
            "var/lib/cloud/instance/scripts",
            "run",
            "tmp",
            "root",
            "opt/ecsmesh-test/stubs",
            "opt/ecsmesh-test/image/usr/local/bin",
            "opt/ecsmesh-test/image/usr/local/share/ecsmesh",
            "opt/ecsmesh-test/image/etc/ssl",
            // The AMI's CA certificates (AL2023 has them too).
            "etc/ssl",
        ] {
            mk(d);
        }
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        // Merged /usr, as on AL2023 (and this host).
        for (link, to) in [
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            std::os::unix::fs::symlink(to, root.join(link)).unwrap();
        }
        std::os::unix::fs::symlink("../run", root.join("var/run")).unwrap();
        let write = |rel: &str, text: &str, mode: u32| {
            let p = root.join(rel.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("etc/hosts", spec.hosts, 0o644);
        write("etc/resolv.conf", "", 0o644);
        write("etc/nsswitch.conf", "hosts: files dns\n", 0o644);
        write(STUB_LOG, "", 0o644);
        for (name, text) in [
            ("docker", DOCKER_STUB),
            ("aws", AWS_STUB),
            ("systemctl", SYSTEMCTL_STUB),
            ("dnf", DNF_STUB),
        ] {
            write(&format!("{TEST_DIR}/stubs/{name}"), text, 0o755);
        }
        write(&format!("{TEST_DIR}/image-uri"), spec.image_uri, 0o644);
        write(&format!("{TEST_DIR}/region"), spec.region, 0o644);
        for (name, value) in spec.ssm {
            write(
                &format!("{TEST_DIR}/ssm/{}", name.trim_start_matches('/')),
                value,
                0o644,
            );
        }
        // The image's files (deploy/Dockerfile): the binary and its CA certificates
        // (`ca-certificates`; this host is Debian bookworm like the image), bind-mounted
        // below, and the systemd unit.
        write(
            &format!("{TEST_DIR}/image/usr/local/bin/ecsmesh"),
            "",
            0o755,
        );
        std::fs::copy(
            repo_path("deploy/ecsmesh.service"),
            root.join("opt/ecsmesh-test/image/usr/local/share/ecsmesh/ecsmesh.service"),
        )
        .unwrap();

        // The namespaces: a mount namespace, and a cgroup namespace rooted at the
        // instance's cgroup, so its processes see that cgroup as the host's root (in
        // `/proc/self/cgroup` and in the cgroup2 mount on /sys/fs/cgroup) as on a real
        // instance. Held by a bounded sleep, started in the instance's cgroup (the root
        // it unshares) and netns, then moved to the boot cgroup; the world's cgroup tree
        // kills it on drop too.
        let mut holder = Command::new("unshare");
        holder.args([
            "--mount",
            "--cgroup",
            "--propagation",
            "private",
            "--",
            "sleep",
            "900",
        ]);
        process::place(
            &mut holder,
            &Placement {
                netns: spec.netns.clone(),
                cgroup: spec.cgroup_root.clone(),
                cpu: None,
            },
        );
        holder
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let holder = Proc {
            child: holder.spawn().expect("spawn unshare"),
            name: "mount namespace holder".into(),
        };
        let this = Machine {
            root: root.clone(),
            netns: spec.netns.clone(),
            boot_cgroup: spec.boot_cgroup.clone(),
            holder: Some(holder),
        };
        // Wait until the holder is in its own mount namespace.
        let own = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let pid = this.holder_pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .ok()
            .as_ref()
            == Some(&own)
            || std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|e| !e.ends_with("sleep"))
                .unwrap_or(true)
        {
            assert!(
                Instant::now() < deadline,
                "unshare did not start its namespace"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::write(spec.boot_cgroup.join("cgroup.procs"), pid.to_string())
            .expect("move the namespace holder to the boot cgroup");
        let r = root.display();
        let setup = format!(
            "set -eu\n\
             mount --rbind /usr {r}/usr && mount -o remount,bind,ro {r}/usr\n\
             mount -t tmpfs -o mode=0755 tmpfs {r}/usr/local\n\
             mkdir -p {r}/usr/local/bin {r}/usr/local/sbin {r}/usr/local/share\n\
             mount --rbind /dev {r}/dev\n\
             mount --rbind /proc {r}/proc\n\
             mount --bind /sys {r}/sys\n\
             mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 {r}/sys/fs/cgroup\n\
             mount --bind {bin} {r}{TEST_DIR}/image/usr/local/bin/ecsmesh\n\
             mount --rbind /etc/ssl {r}{TEST_DIR}/image/etc/ssl\n\
             mount --rbind /etc/ssl {r}/etc/ssl\n",
            bin = spec.ecsmesh.display(),
        );
        let out = this.in_namespace(&["sh", "-c", &setup]);
        assert!(
            out.status.success(),
            "setting up the instance root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        this
    }

    fn holder_pid(&self) -> i32 {
        self.holder.as_ref().expect("namespace held").pid()
    }

    /// Runs `argv` in the namespaces (outside the instance root), to completion.
    fn in_namespace(&self, argv: &[&str]) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.holder_pid()))
            .args(["--mount", "--cgroup", "--"])
            .args(argv);
        process::run(cmd)
    }

    /// `argv` as a process of the instance: its mount namespace and root, its netns,
    /// `cgroup` (default: the boot cgroup), a clean environment with the stubs first on
    /// PATH.
    pub fn command(&self, argv: &[&str], cgroup: Option<&Path>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.holder_pid()))
            .args(["--mount", "--cgroup", "--"])
            .arg("chroot")
            .arg(&self.root)
            .args([
                "/usr/bin/env",
                "-i",
                &format!("PATH={PATH}"),
                "HOME=/root",
                "LANG=C",
            ])
            .args(argv);
        process::place(
            &mut cmd,
            &Placement {
                netns: self.netns.clone(),
                cgroup: cgroup.unwrap_or(&self.boot_cgroup).to_path_buf(),
                cpu: None,
            },
        );
        cmd
    }

    /// Writes `script` where cloud-init keeps user data and runs it with bash as root,
    /// bounded by `within`: (exit status, stdout + stderr).
    pub fn run_user_data(&self, script: &str, within: Duration) -> (bool, String) {
        let rel = "var/lib/cloud/instance/scripts/part-001";
        std::fs::write(self.root.join(rel), script).unwrap();
        std::fs::set_permissions(self.root.join(rel), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        let mut cmd = self.command(&["/bin/bash", &format!("/{rel}")], None);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run the user data");
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut text = String::new();
        let _ = child.stdout.take().unwrap().read_to_string(&mut text);
        let _ = child.stderr.take().unwrap().read_to_string(&mut text);
        match status {
            Some(st) => (st.success(), format!("{st}\n{text}")),
            None => (
                false,
                format!("user data still running after {within:?}\n{text}"),
            ),
        }
    }

    /// An `awsvpc` task's pause container, as the ECS agent starts one first to hold the
    /// task's network namespace: a bounded `sleep` in `cgroup` (below the task's slice)
    /// and the instance's netns, which `docker run --network container:<name>` joins
    /// (the stub looks its pid up). Kill it after the task's other containers.
    pub fn start_pause(&self, name: &str, cgroup: &Path) -> Proc {
        let mut cmd = self.command(&["/usr/bin/sleep", "900"], Some(cgroup));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let p = Proc {
            child: cmd.spawn().expect("spawn the pause container"),
            name: format!("pause container {name}"),
        };
        let dir = self.path(&format!("/var/lib/docker-stub/containers/{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pid"), p.pid().to_string()).unwrap();
        p
    }

    /// A path as the instance's processes see it, read through its mount namespace (so
    /// mounts made in it, like the user data's bpffs, are visible), e.g. to look at pins.
    pub fn ns_path(&self, abs: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.holder_pid()))
            .join(self.root.strip_prefix("/").unwrap_or(&self.root))
            .join(abs.trim_start_matches('/'))
    }

    /// A file of the instance (`/etc/ecsmesh/config.toml`) as the test sees it.
    pub fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    pub fn read(&self, abs: &str) -> String {
        std::fs::read_to_string(self.path(abs))
            .unwrap_or_else(|e| panic!("{abs} on the instance: {e}"))
    }

    /// The stubs' log: one line per call, the command and its shell-quoted argv.
    pub fn stub_calls(&self) -> Vec<String> {
        self.read(STUB_LOG).lines().map(str::to_owned).collect()
    }

    /// The mount namespace's mount table (`/proc/<pid>/mountinfo` of its holder).
    pub fn mountinfo(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.holder_pid()))
            .unwrap_or_default()
    }

    /// Ends the namespace (every mount in it, the user data's bpffs too). Callers stop
    /// their processes in it first; `cleanup` runs in the instance before that.
    pub fn shut_down(&mut self, cleanup: Option<&[&str]>) {
        if self.holder.is_none() {
            return;
        }
        if let Some(argv) = cleanup {
            let _ = process::run(self.command(argv, None));
        }
        if let Some(mut h) = self.holder.take() {
            h.signal(nix::sys::signal::Signal::SIGKILL);
            let _ = h.wait_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shut_down(None);
    }
}

/// `docker`: `login`, `pull`, `create`, `cp`, `rm` of the one image the test provides
/// (`/opt/ecsmesh-test/image`), and `run` emulated (see the module doc).
const DOCKER_STUB: &str = r#"#!/bin/bash
# ecsmesh boot test: a stand-in for docker, emulating what the user data and the ECS
# daemon task need. Not a container runtime: see tests/src/boot.rs.
set -euo pipefail
die() { echo "docker stub: $*" >&2; exit 125; }
if [ -z "${DOCKER_STUB_IN_NS:-}" ]; then
  # One write per call: the stubs of a pipeline run (and log) concurrently.
  args=$(printf ' %q' "$@"); printf 'docker%s\n' "$args" >>/var/log/ecsmesh-test-stubs.log
fi
image_uri=$(cat /opt/ecsmesh-test/image-uri)
image_dir=/opt/ecsmesh-test/image
check_image() { [ "$1" = "$image_uri" ] || die "no such image: $1 (this instance only has $image_uri)"; }
cmd=${1:-}; shift || true
case "$cmd" in
  login)
    [ "${*: -1}" = "${image_uri%%/*}" ] || die "login to an unexpected registry: ${*: -1}"
    pw=$(cat); [ -n "$pw" ] || die "login: no password on stdin"
    echo "Login Succeeded" ;;
  pull) check_image "$1" ;;
  create)
    check_image "$1"
    mkdir -p /var/lib/docker-stub
    id=$(mktemp -d /var/lib/docker-stub/cXXXXXX); basename "$id" ;;
  cp)
    src=$1 dst=$2; cid=${src%%:*}; path=${src#*:}
    [ -d "/var/lib/docker-stub/$cid" ] || die "cp: no such container $cid"
    cp "$image_dir$path" "$dst" ;;
  rm) [ -d "/var/lib/docker-stub/$1" ] || die "rm: no such container $1"; rm -rf "/var/lib/docker-stub/$1" ;;
  run)
    # Phase 1: a mount namespace and (Docker's default on cgroup v2) a cgroup namespace
    # of the container's own, rooted at the cgroup it runs in; phase 2 (below) builds its
    # root. The instance's mounts are private already (the test made its namespace so),
    # and its / is a chroot, not a mount whose propagation could be changed.
    if [ -z "${DOCKER_STUB_IN_NS:-}" ]; then
      DOCKER_STUB_IN_NS=1 exec unshare --mount --cgroup --propagation unchanged -- "$0" run "$@"
    fi
    network=default pid= user= readonly=0 mounts=() envs=() limits=()
    caps=(chown dac_override fowner fsetid kill setgid setuid setpcap net_bind_service net_raw sys_chroot mknod audit_write setfcap)
    while [ $# -gt 0 ]; do
      case "$1" in
        --rm) shift ;;
        --network) network=$2; shift 2 ;;
        --pid) pid=$2; shift 2 ;;
        --user) user=$2; shift 2 ;;
        --cap-drop) if [ "$2" = ALL ]; then caps=(); else die "--cap-drop $2: only ALL is emulated"; fi; shift 2 ;;
        --cap-add) caps+=("$(echo "$2" | tr 'A-Z' 'a-z')"); shift 2 ;;
        --ulimit)
          name=${2%%=*} v=${2#*=}; soft=${v%%:*} hard=${v#*:}
          [ "$soft" = -1 ] && soft=unlimited; [ "$hard" = -1 ] && hard=unlimited
          limits+=("--$name=$soft:$hard"); shift 2 ;;
        --read-only) readonly=1; shift ;;
        -e) envs+=("$2"); shift 2 ;;
        -v) mounts+=("$2"); shift 2 ;;
        -*) die "run: option $1 is not emulated" ;;
        *) break ;;
      esac
    done
    [ $# -ge 1 ] || die "run: no image"
    check_image "$1"; shift
    # Host networking (the user data and the daemon task: IMDSv2 answers one hop only)
    # shares the instance's netns; `container:<name>` (an awsvpc task's containers) joins
    # the netns of that (pause) container, whose pid the test recorded.
    join_net=()
    case "$network" in
      host) ;;
      container:*)
        f=/var/lib/docker-stub/containers/${network#container:}/pid
        [ -f "$f" ] || die "run: --network $network: no such container"
        join_net=(/usr/bin/nsenter "--net=/proc/$(cat "$f")/ns/net" --) ;;
      *) die "run: --network $network is not emulated (only host and container:<name>)" ;;
    esac
    [ -z "$pid" ] || [ "$pid" = host ] || die "run: --pid $pid is not emulated"
    uid=${user:-65532}  # the image's USER
    mkdir -p /var/lib/docker-stub
    root=$(mktemp -d /var/lib/docker-stub/rootXXXXXX)
    mount -t tmpfs -o mode=0755 tmpfs "$root"
    mkdir -p "$root"/{usr,dev,proc,sys,etc,tmp,run,root}
    for l in bin:usr/bin sbin:usr/sbin lib:usr/lib lib64:usr/lib64; do ln -s "${l#*:}" "$root/${l%%:*}"; done
    mkdir -p "$root/var"; ln -s ../run "$root/var/run"
    mount --rbind /usr "$root/usr"; mount -o remount,bind,ro "$root/usr"
    # The image's /usr/local (ENTRYPOINT /usr/local/bin/ecsmesh).
    mount --rbind "$image_dir/usr/local" "$root/usr/local"; mount -o remount,bind,ro "$root/usr/local"
    mount --rbind /dev "$root/dev"
    mount --rbind /proc "$root/proc"
    mount --bind /sys "$root/sys"; mount -o remount,bind,ro "$root/sys"
    # The container's own cgroup (its cgroup namespace's root) at /sys/fs/cgroup, read-only,
    # mounted before any volume, as Docker does.
    mount -t cgroup2 -o ro,nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"
    # The image's /etc/ssl (its ca-certificates) and nsswitch.conf (Debian's); with host
    # networking docker gives the container the host's hosts and resolv.conf.
    mkdir -p "$root/etc/ssl"; mount --rbind "$image_dir/etc/ssl" "$root/etc/ssl"
    for f in hosts resolv.conf; do touch "$root/etc/$f"; mount --bind "/etc/$f" "$root/etc/$f"; done
    echo "hosts: files dns" >"$root/etc/nsswitch.conf"
    for m in "${mounts[@]}"; do
      IFS=: read -r src dst opt <<<"$m"
      [ -e "$src" ] || mkdir -p "$src"   # docker creates a missing host path as a directory
      if [ -d "$src" ]; then mkdir -p "$root$dst"; else mkdir -p "$(dirname "$root$dst")"; touch "$root$dst"; fi
      mount --bind "$src" "$root$dst"
      case "$opt" in ro) mount -o remount,bind,ro "$root$dst" ;; ''|rw) ;; *) die "-v option $opt" ;; esac
    done
    [ "$readonly" = 1 ] && mount -o remount,ro "$root"
    bounding=-all; for c in "${caps[@]}"; do bounding+=",+$c"; done
    # A limit this host cannot raise (no CAP_SYS_RESOURCE in the test's own container)
    # is left as it is, said on stderr: the node's kernel charges BPF maps to memory
    # cgroups (>= 5.11), not RLIMIT_MEMLOCK.
    applied=()
    for l in "${limits[@]}"; do
      if err=$(prlimit --pid $$ "$l" 2>&1); then applied+=("$l"); else echo "docker stub: --ulimit ${l#--} not applied: $err" >&2; fi
    done
    prlimit=(); [ ${#applied[@]} -eq 0 ] || prlimit=(/usr/bin/prlimit "${applied[@]}" --)
    exec "${join_net[@]}" chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "${envs[@]}" \
      "${prlimit[@]}" \
      /usr/bin/setpriv --reuid="$uid" --regid="$uid" --clear-groups --inh-caps=-all --bounding-set="$bounding" -- \
      /usr/local/bin/ecsmesh "$@" ;;
  *) die "docker $cmd is not emulated" ;;
esac
"#;

/// `aws`: `ssm get-parameter` from the test's parameters, `ecr get-login-password`.
const AWS_STUB: &str = r#"#!/bin/bash
# ecsmesh boot test: a stand-in for the AWS CLI (the calls the user data makes).
set -euo pipefail
die() { echo "aws stub: $*" >&2; exit 252; }
# One write per call: the stubs of a pipeline run (and log) concurrently.
args=$(printf ' %q' "$@"); printf 'aws%s\n' "$args" >>/var/log/ecsmesh-test-stubs.log
region=$(cat /opt/ecsmesh-test/region)
svc=${1:-} op=${2:-}; shift 2 || die "usage"
declare -A o=()
while [ $# -gt 0 ]; do
  case "$1" in --*) o[${1#--}]=${2-}; shift 2 ;; *) die "unexpected argument $1" ;; esac
done
[ "${o[region]-}" = "$region" ] || die "--region ${o[region]-(none)}: the instance is in $region"
case "$svc $op" in
  "ssm get-parameter")
    [ "${o[query]-}" = Parameter.Value ] && [ "${o[output]-}" = text ] || die "ssm get-parameter: expected --query Parameter.Value --output text"
    f=/opt/ecsmesh-test/ssm/${o[name]#/}
    [ -f "$f" ] || { echo "An error occurred (ParameterNotFound) when calling the GetParameter operation: ${o[name]}" >&2; exit 254; }
    cat "$f" ;;
  "ecr get-login-password") echo fixture-ecr-password ;;
  *) die "aws $svc $op is not emulated" ;;
esac
"#;

/// `systemctl`: the units the user data starts; `ecstasks.slice` creates its cgroup, as
/// systemd does.
const SYSTEMCTL_STUB: &str = r#"#!/bin/bash
# ecsmesh boot test: a stand-in for systemctl.
set -euo pipefail
# One write per call: the stubs of a pipeline run (and log) concurrently.
args=$(printf ' %q' "$@"); printf 'systemctl%s\n' "$args" >>/var/log/ecsmesh-test-stubs.log
case "$*" in
  "start ecstasks.slice") mkdir -p /sys/fs/cgroup/ecstasks.slice ;;
  "start docker"|"daemon-reload"|"enable --now --no-block ecs.service"|"enable --now ecsmesh.service") ;;
  *) echo "systemctl stub: $* is not emulated" >&2; exit 1 ;;
esac
"#;

/// `dnf`: never needed (the AMI has the AWS CLI, here the stub); logged and refused.
const DNF_STUB: &str = r#"#!/bin/bash
# One write per call: the stubs of a pipeline run (and log) concurrently.
args=$(printf ' %q' "$@"); printf 'dnf%s\n' "$args" >>/var/log/ecsmesh-test-stubs.log
echo "dnf stub: installing packages is not emulated" >&2
exit 1
"#;
