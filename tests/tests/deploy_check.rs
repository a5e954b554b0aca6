//! `deploy/check.py` passes the real deploy artefacts and catches each kind of breakage:
//! invalid JSON, a misspelled or mistyped task-definition field (botocore's ECS model), a
//! CloudFormation error (cfn-lint), and a systemd unit no longer ordered before the ECS
//! agent. No root needed; the Python tools come from the venv that
//! `cargo xtask deploy-check` (and `cargo xtask test`, before the tests) creates.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn venv_python() -> PathBuf {
    let python = workspace().join("target/pyenv/bin/python");
    if !python.is_file() {
        panic!(
            "{} is missing: run `cargo xtask deploy-check` first",
            python.display()
        );
    }
    python
}

/// Run the checker on `dir`: (succeeded, stdout + stderr).
fn check(dir: &Path) -> (bool, String) {
    let out = Command::new(venv_python())
        .arg(workspace().join("deploy/check.py"))
        .arg(dir)
        .output()
        .expect("running deploy/check.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A copy of deploy/ in a temporary directory, removed on drop.
struct DeployCopy(PathBuf);

impl DeployCopy {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ecsmesh-deploy-check-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(workspace().join("deploy")).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
            }
        }
        DeployCopy(dir)
    }

    /// Rewrite one file; the edit must change it, so a test cannot pass by editing nothing.
    fn edit(&self, file: &str, f: impl FnOnce(&str) -> String) {
        let path = self.0.join(file);
        let before = std::fs::read_to_string(&path).unwrap();
        let after = f(&before);
        assert_ne!(before, after, "the edit of {file} changed nothing");
        std::fs::write(&path, after).unwrap();
    }
}

impl Drop for DeployCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Break one file in a fresh copy and require the checker to fail with `fail_line` (and
/// every string of `mentions`) in its output.
fn assert_caught(
    tag: &str,
    file: &str,
    edit: impl FnOnce(&str) -> String,
    fail_line: &str,
    mentions: &[&str],
) {
    let copy = DeployCopy::new(tag);
    copy.edit(file, edit);
    let (ok, out) = check(&copy.0);
    assert!(!ok, "check.py passed a broken {file}:\n{out}");
    assert!(
        out.lines().any(|l| l.starts_with(fail_line)),
        "no line starting with {fail_line:?}:\n{out}"
    );
    for m in mentions {
        assert!(out.contains(m), "output does not mention {m:?}:\n{out}");
    }
}

#[test]
fn real_deploy_artefacts_pass() {
    let (ok, out) = check(&workspace().join("deploy"));
    assert!(ok, "deploy/ fails its own checks:\n{out}");
    for line in [
        "PASS cfn-lint cloudformation.yaml",
        "PASS ecs-model task-definition-daemon.json",
        "PASS ecs-model task-definition-sidecar.json",
        "PASS iam-policy iam-policy.json",
        "PASS systemd ecsmesh.service",
        "PASS promtool-config prometheus-scrape.yml",
        "PASS dashboard-promql grafana-dashboard.json",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?}:\n{out}");
    }
}

#[test]
fn a_broken_dashboard_query_or_scrape_config_is_caught_by_promtool() {
    assert_caught(
        "promql",
        "grafana-dashboard.json",
        |s| s.replacen("rate(istio_requests_total", "rate(istio_requests_total(", 1),
        "FAIL dashboard-promql grafana-dashboard.json",
        &["parse error"],
    );
    assert_caught(
        "scrape",
        "prometheus-scrape.yml",
        |s| s.replacen("scrape_interval: 15s", "scrape_interval: fifteen", 1),
        "FAIL promtool-config prometheus-scrape.yml",
        &["fifteen"],
    );
}

#[test]
fn invalid_json_is_caught() {
    assert_caught(
        "json",
        "task-definition-daemon.json",
        |s| s.replacen("\"family\":", "\"family\"", 1),
        "FAIL json task-definition-daemon.json",
        &["invalid JSON"],
    );
}

#[test]
fn misspelled_container_field_is_caught() {
    assert_caught(
        "unknown-field",
        "task-definition-daemon.json",
        |s| s.replacen("\"memoryReservation\"", "\"memoryReservaton\"", 1),
        "FAIL ecs-model task-definition-daemon.json",
        &[
            "Unknown parameter in containerDefinitions[0]",
            "memoryReservaton",
        ],
    );
}

#[test]
fn wrong_field_type_is_caught() {
    assert_caught(
        "wrong-type",
        "task-definition-daemon.json",
        |s| s.replacen("\"cpu\": 256", "\"cpu\": \"lots\"", 1),
        "FAIL ecs-model task-definition-daemon.json",
        &["containerDefinitions[0].cpu"],
    );
}

#[test]
fn cloudformation_error_is_caught() {
    assert_caught(
        "cfn-ref",
        "cloudformation.yaml",
        |s| {
            s.replacen(
                "TaskDefinition: !Ref DaemonTaskDefinition",
                "TaskDefinition: !Ref NoSuchTaskDefinition",
                1,
            )
        },
        "FAIL cfn-lint cloudformation.yaml",
        &["NoSuchTaskDefinition"],
    );
}

#[test]
fn unit_not_ordered_before_ecs_is_caught() {
    assert_caught(
        "systemd",
        "ecsmesh.service",
        |s| {
            s.lines()
                .filter(|l| !l.starts_with("Before="))
                .map(|l| format!("{l}\n"))
                .collect()
        },
        "FAIL systemd ecsmesh.service",
        &["Before=ecs.service"],
    );
}

#[test]
fn a_daemon_task_without_the_docker_socket_mount_is_caught() {
    // The mount point goes (its volume stays): the node's `[ecs] docker_socket`, which the
    // user data's bootstrap writes, would name a socket the container does not have, and
    // health gating would be off.
    assert_caught(
        "docker-sock",
        "task-definition-daemon.json",
        |s| {
            s.lines()
                .filter(|l| !l.contains("\"sourceVolume\": \"docker-socket\""))
                .map(|l| format!("{l}\n"))
                .collect()
        },
        "FAIL daemon-shape task-definition-daemon.json",
        &["/var/run/docker.sock must be mounted", "health"],
    );
}

#[test]
fn a_sidecar_task_with_a_per_task_config_or_bridge_networking_is_caught() {
    // A config only this task could use (the old shape), in bridge mode, without a role.
    assert_caught(
        "sidecar-per-task",
        "task-definition-sidecar.json",
        |s| {
            s.replace("/etc/ecsmesh/sidecar.toml", "/etc/ecsmesh/example-app.toml")
                .replace("\"awsvpc\"", "\"bridge\"")
                .lines()
                .filter(|l| !l.contains("\"taskRoleArn\""))
                .map(|l| format!("{l}\n"))
                .collect()
        },
        "FAIL sidecar-shape task-definition-sidecar.json",
        &[
            "awsvpc",
            "taskRoleArn is required",
            "/etc/ecsmesh/example-app.toml on the host, which the user data's `ecsmesh bootstrap --sidecar-out` does not write",
        ],
    );
}

#[test]
fn an_issuer_state_file_outside_its_efs_volume_is_caught() {
    assert_caught(
        "issuer-state",
        "cloudformation.yaml",
        |s| {
            s.replace(
                "/var/lib/ecsmesh-issuer/issuer-state.json",
                "/tmp/issuer-state.json",
            )
        },
        "FAIL issuer-service cloudformation.yaml",
        &["'/tmp/issuer-state.json' is not on an EFS volume"],
    );
}
