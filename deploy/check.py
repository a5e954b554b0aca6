#!/usr/bin/env python3
"""Offline validation of the ecsmesh deploy artefacts.

    check.py DEPLOY_DIR

Run with the project's venv (`cargo xtask deploy-check` creates it and runs this): it
needs cfn-lint, botocore and PyYAML from xtask/requirements.txt. Nothing here talks to
AWS. Prints one line per check, `PASS <check> <file>` or `FAIL <check> <file>: <reason>`
(with one indented line per further error), and exits 1 when any check fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

REQUIRED_FILES = [
    "Dockerfile",
    "task-definition-daemon.json",
    "task-definition-sidecar.json",
    "cloudformation.yaml",
    "iam-policy.json",
    "ecsmesh.service",
    "prometheus-scrape.yml",
    "grafana-dashboard.json",
]
PROMTOOL = "/usr/bin/promtool"
CFN_POLICY_RESOURCE = "EcsmeshPolicy"
CFN_DAEMON_TASK_DEFINITION = "DaemonTaskDefinition"
CFN_LAUNCH_TEMPLATE = "LaunchTemplate"
DOCKER_SOCKET = "/var/run/docker.sock"


class Checker:
    def __init__(self) -> None:
        self.failed = 0

    def result(self, check: str, subject: str, errors: list[str]) -> bool:
        if errors:
            self.failed += 1
            print(f"FAIL {check} {subject}: {errors[0]}")
            for more in errors[1:]:
                print(f"    {more}")
        else:
            print(f"PASS {check} {subject}")
        sys.stdout.flush()
        return not errors

    def run(self, check: str, subject: str, fn: Callable[[], list[str]]) -> bool:
        try:
            errors = fn()
        except Exception as e:  # a crash in a check is a failure of that check, not of all
            errors = [f"{type(e).__name__}: {e}"]
        return self.result(check, subject, errors)


# --- YAML with CloudFormation tags ----------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that turns any `!Tag value` into `{"Fn::Tag" or "Ref": value}`."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_CfnLoader)  # noqa: S506 (SafeLoader subclass)


# --- checks ---------------------------------------------------------------------------


def check_json(path: Path, parsed: dict[str, Any]) -> list[str]:
    try:
        parsed[path.name] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"invalid JSON: {e}"]
    return []


def check_yaml(path: Path, parsed: dict[str, Any]) -> list[str]:
    try:
        parsed[path.name] = load_yaml(path)
    except yaml.YAMLError as e:
        return [f"invalid YAML: {' '.join(str(e).split())}"]
    return []


def check_cfn_lint(path: Path) -> list[str]:
    from cfnlint.api import ManualArgs, lint

    matches = lint(
        path.read_text(),
        config=ManualArgs(regions=["us-east-1"], include_checks=["I"]),
    )
    errors = []
    warnings = []
    for m in matches:
        line = f"{m.rule.id} line {m.linenumber}: {m.message}"
        (errors if m.rule.id.startswith("E") else warnings).append(line)
    for w in warnings:  # reported, not failing
        print(f"WARN cfn-lint {path.name}: {w}")
    return errors


def check_ecs_model(task_def: Any) -> list[str]:
    import botocore.session
    from botocore.validate import ParamValidator

    if not isinstance(task_def, dict):
        return ["top level must be a JSON object (RegisterTaskDefinition input)"]
    model = botocore.session.get_session().get_service_model("ecs")
    shape = model.operation_model("RegisterTaskDefinition").input_shape
    report = ParamValidator().validate(task_def, shape)
    if not report.has_errors():
        return []
    # One line per error, each naming its path, e.g. "Invalid type for parameter
    # containerDefinitions[0].cpu, value: lots, ...".
    return [line.strip() for line in report.generate_report().splitlines() if line.strip()]


def check_daemon_shape(task_def: Any) -> list[str]:
    """What the node proxy needs regardless of the API's optional fields."""
    errors = []
    if task_def.get("networkMode") != "host":
        errors.append('networkMode must be "host" (the proxy listens for host-mode tasks on loopback)')
    if task_def.get("pidMode") != "host":
        errors.append('pidMode must be "host" (the proxy resolves task processes and namespaces)')
    if "EC2" not in task_def.get("requiresCompatibilities", []):
        errors.append('requiresCompatibilities must include "EC2"')
    containers = task_def.get("containerDefinitions", [])
    if len(containers) != 1:
        return errors + ["exactly one container definition expected"]
    c = containers[0]
    caps = c.get("linuxParameters", {}).get("capabilities", {})
    if not c.get("privileged") and not {"SYS_ADMIN", "NET_ADMIN"} <= set(caps.get("add", [])):
        errors.append("linuxParameters.capabilities.add must include SYS_ADMIN and NET_ADMIN")
    mounts = {m.get("containerPath") for m in c.get("mountPoints", [])}
    if "/sys/fs/bpf" not in mounts:
        errors.append("the host's /sys/fs/bpf must be mounted at /sys/fs/bpf")
    sock = _host_mounts(task_def).get(DOCKER_SOCKET)
    if sock is None:
        errors.append(
            f"the host's {DOCKER_SOCKET} must be mounted (a volume with host sourcePath {DOCKER_SOCKET}): "
            "[ecs] docker_socket gates endpoints on container health"
        )
    elif not sock[1]:
        errors.append(f"the {DOCKER_SOCKET} mount must be readOnly (the proxy only reads container state)")
    if "healthCheck" not in c:
        errors.append("a healthCheck on /ready is required (ECS does not use the image's)")
    return errors


def _host_mounts(task_def: Any) -> dict[str, tuple[str, bool]]:
    """host sourcePath -> (containerPath, readOnly) of the first container (JSON shape)."""
    sources = {v.get("name"): (v.get("host") or {}).get("sourcePath") for v in task_def.get("volumes", [])}
    c = (task_def.get("containerDefinitions") or [{}])[0]
    return {
        sources[m.get("sourceVolume")]: (m.get("containerPath"), bool(m.get("readOnly", False)))
        for m in c.get("mountPoints", [])
        if sources.get(m.get("sourceVolume"))
    }


def _user_data(template: Any) -> tuple[str, dict[str, Any]]:
    """The launch template's user data script and its Fn::Sub variables."""
    lt = (template.get("Resources") or {}).get(CFN_LAUNCH_TEMPLATE) or {}
    ud = ((lt.get("Properties") or {}).get("LaunchTemplateData") or {}).get("UserData") or {}
    body = ud.get("Fn::Base64", ud)
    if isinstance(body, dict) and "Fn::Sub" in body:
        body = body["Fn::Sub"]
    if isinstance(body, list) and body and isinstance(body[0], str):
        return body[0], (body[1] if len(body) > 1 and isinstance(body[1], dict) else {})
    if isinstance(body, str):
        return body, {}
    raise ValueError(f"{CFN_LAUNCH_TEMPLATE}: no user data script (Fn::Base64 of a string or Fn::Sub)")


def bootstrap_invocations(script: str) -> list[list[str]]:
    """Every `... bootstrap --flag value ...` command of a shell script, as words."""
    import shlex

    joined = script.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        words = line.split("#", 1)[0].split()
        if "bootstrap" in words:
            found.append(shlex.split(line.split("#", 1)[0]))
    return found


def _flag(words: list[str], name: str) -> str | None:
    return next((words[i + 1] for i, w in enumerate(words[:-1]) if w == name), None)


def check_bootstrap(template: Any, daemon: Any) -> list[str]:
    """The user data writes the node config with `ecsmesh bootstrap`, with every section."""
    script, _ = _user_data(template)
    errors = []
    if "config.toml <<" in script or ">/etc/ecsmesh/config.toml" in script.replace(" ", ""):
        errors.append("user data writes config.toml itself; `ecsmesh bootstrap` must write it (checked by the node's parser)")
    runs = bootstrap_invocations(script)
    if not runs:
        return errors + ["user data never runs `ecsmesh bootstrap`: the node would have no config"]
    resources = template.get("Resources") or {}
    has_namespace = any(r.get("Type", "").startswith("AWS::ServiceDiscovery::") and r.get("Type", "").endswith("Namespace") for r in resources.values())
    needed = {
        "--cluster": "cluster: identities and the ready attribute name it",
        "--trust-domain": "[identity] trust_domain",
        "--issuer-url": "[identity] issuer_url (issuer mode)",
    }
    if has_namespace:
        needed["--cloudmap-namespace"] = "[cloudmap] namespace (the template has a Cloud Map namespace)"
        needed["--cloudmap-service"] = "[cloudmap] services"
    for words in runs:
        where = "docker run" if "docker" in words else (words[0] if words else "?")
        for flag, why in needed.items():
            if _flag(words, flag) is None:
                errors.append(f"bootstrap via {where}: {flag} missing ({why})")
        url = _flag(words, "--issuer-url")
        if url is not None and not url.startswith("https://"):
            errors.append(f"bootstrap via {where}: --issuer-url {url!r} must be https://")
        if "docker" in words and isinstance(daemon, dict):
            # Paths are those the daemon task sees: they must be its mounts.
            mounts = _host_mounts(daemon)
            cg_mount = (mounts.get("/sys/fs/cgroup") or ("?", True))[0]
            for flag in ("--cgroup-root", "--ecs-cgroup-root"):
                value = _flag(words, flag) or ""
                if not value.startswith(cg_mount):
                    errors.append(f"bootstrap via docker run: {flag} {value!r} is not below the daemon's host cgroupfs mount {cg_mount!r}")
            sock = _flag(words, "--docker-socket") or "/var/run/docker.sock"
            mounted = (mounts.get(DOCKER_SOCKET) or (None,))[0]
            if mounted is None:
                errors.append(f"bootstrap via docker run: --docker-socket {sock!r}, but the daemon task does not mount {DOCKER_SOCKET}")
            elif mounted != sock:
                errors.append(f"bootstrap via docker run: --docker-socket {sock!r}, but the daemon task mounts {DOCKER_SOCKET} at {mounted!r}")
    return errors


def check_sidecar_shape(task_def: Any, template: Any) -> list[str]:
    """A sidecar task that works with nothing per task: awsvpc (the sidecar shares its
    app's netns), a task role (its identity), the config every sidecar of the instance
    shares (written by `ecsmesh bootstrap --sidecar-out`), no key material."""
    errors = []
    if task_def.get("networkMode") != "awsvpc":
        errors.append('networkMode must be "awsvpc": a sidecar sees only the connections of containers sharing its netns')
    if not task_def.get("taskRoleArn"):
        errors.append("taskRoleArn is required: the sidecar proves its task to the issuer with the task role")
    containers = task_def.get("containerDefinitions", [])
    sidecars = [c for c in containers if (c.get("command") or [None])[0] == "sidecar"]
    if len(sidecars) != 1:
        return errors + ["exactly one container must run `sidecar`"]
    c = sidecars[0]
    cmd = c.get("command") or []
    config = _flag(cmd, "--config")
    mounts = {m.get("containerPath"): m for m in c.get("mountPoints", [])}
    sources = {v.get("name"): (v.get("host") or {}).get("sourcePath") for v in task_def.get("volumes", [])}
    host_config = None
    for path, m in mounts.items():
        if config and path and config.startswith(path.rstrip("/") + "/"):
            src = sources.get(m.get("sourceVolume"))
            if src:
                host_config = src.rstrip("/") + config[len(path.rstrip("/")):]
    if host_config is None:
        errors.append(f"--config {config!r} must be a file of a host volume (the instance's shared sidecar config)")
    elif isinstance(template, dict):
        script, _ = _user_data(template)
        outs = {_flag(w, "--sidecar-out") for w in bootstrap_invocations(script)} - {None}
        if host_config not in outs:
            errors.append(
                f"--config {config!r} is {host_config} on the host, which the user data's "
                f"`ecsmesh bootstrap --sidecar-out` does not write (it writes {sorted(outs) or 'nothing'})"
            )
    for need, why in (("/sys/fs/bpf", "pins"), ("/host/sys/fs/cgroup", "the task's cgroup, where the redirect attaches")):
        if need not in mounts:
            errors.append(f"{need} must be mounted ({why})")
    if c.get("readonlyRootFilesystem") and "/run/ecsmesh" not in mounts:
        errors.append("a writable /run/ecsmesh volume is needed with readonlyRootFilesystem (admin socket)")
    caps = c.get("linuxParameters", {}).get("capabilities", {})
    if not {"SYS_ADMIN", "NET_ADMIN"} <= set(caps.get("add", [])):
        errors.append("linuxParameters.capabilities.add must include SYS_ADMIN and NET_ADMIN")
    for env in c.get("environment", []) + c.get("secrets", []):
        name = str(env.get("name", "")).upper()
        if any(k in name for k in ("KEY", "CERT", "SVID", "PEM")) or "BEGIN" in str(env.get("value", "")):
            errors.append(f"{env.get('name')}: no key or certificate material in a task definition (the sidecar gets its own from the issuer)")
    name = c.get("name")
    for other in containers:
        if other is c:
            continue
        deps = {(d.get("containerName"), d.get("condition")) for d in other.get("dependsOn", [])}
        if (name, "HEALTHY") not in deps:
            errors.append(f"{other.get('name')}: must dependsOn {name} HEALTHY (its first connect must find the redirect in place)")
    return errors


def check_issuer_service(template: Any) -> list[str]:
    """An `ecsmesh issuer run` service exists, outside the mesh, reachable through Cloud Map."""
    resources = template.get("Resources") or {}
    script, sub_vars = _user_data(template)
    found = []
    errors = []
    for name, r in resources.items():
        if r.get("Type") != "AWS::ECS::Service":
            continue
        props = r.get("Properties") or {}
        td_ref = props.get("TaskDefinition")
        td_name = td_ref.get("Ref") if isinstance(td_ref, dict) else None
        td = (resources.get(td_name) or {}).get("Properties") or {}
        words = " ".join(
            str(x) for c in td.get("ContainerDefinitions", []) for x in [*(c.get("EntryPoint") or []), *(c.get("Command") or [])]
        )
        if "issuer run" not in words:
            continue
        found.append(name)
        if props.get("SchedulingStrategy") == "DAEMON":
            errors.append(f"{name}: the issuer must be a REPLICA service, not a DAEMON")
        if "ecsmesh.ready" in json.dumps(props.get("PlacementConstraints", [])):
            errors.append(f"{name}: the issuer must not be placed with attribute:ecsmesh.ready (proxies need the issuer to get ready)")
        if td.get("NetworkMode") != "awsvpc":
            errors.append(
                f"{td_name}: the issuer's NetworkMode must be awsvpc (a host or bridge task would be enrolled by the node proxy it serves)"
            )
        import re

        state = re.search(r'state_file\s*=\s*"([^"]+)"', words)
        efs = {
            m.get("ContainerPath")
            for c in td.get("ContainerDefinitions", [])
            for m in c.get("MountPoints", [])
            if any(v.get("Name") == m.get("SourceVolume") and "EFSVolumeConfiguration" in v for v in td.get("Volumes", []))
        }
        if not state:
            errors.append(f"{td_name}: the issuer config sets no state_file")
        elif not any(p and state.group(1).startswith(p.rstrip("/") + "/") for p in efs):
            errors.append(
                f"{td_name}: state_file {state.group(1)!r} is not on an EFS volume: a replaced issuer task would "
                "start with no replay records and no deny list"
            )
        if (props.get("DeploymentConfiguration") or {}).get("MaximumPercent", 200) > 100 or props.get("DesiredCount", 1) != 1:
            errors.append(f"{name}: one issuer task, stop-then-start (DesiredCount 1, MaximumPercent 100): the state file has one writer")
        registries = props.get("ServiceRegistries") or []
        if not registries:
            errors.append(f"{name}: no ServiceRegistries: nodes find the issuer through Cloud Map")
        for reg in registries:
            arn = reg.get("RegistryArn")
            reg_name = arn.get("Fn::GetAtt", [None])[0] if isinstance(arn, dict) else None
            reg_props = (resources.get(reg_name) or {}).get("Properties") or {}
            types = {d.get("Type") for d in (reg_props.get("DnsConfig") or {}).get("DnsRecords", [])}
            if "A" not in types:
                errors.append(f"{reg_name}: the issuer's Cloud Map service needs an A record (nodes dial issuer_url by host name)")
            if reg_name and reg_name not in script + json.dumps(sub_vars):
                errors.append(f"user data: --issuer-url does not use the issuer's Cloud Map service {reg_name}")
    if not found:
        errors.append("no ECS service runs `ecsmesh issuer run`: nodes in issuer mode would get no certificates")
    return errors


def _statements(doc: Any) -> list[dict[str, Any]]:
    stmts = doc.get("Statement", []) if isinstance(doc, dict) else []
    return [stmts] if isinstance(stmts, dict) else list(stmts)


def _as_set(v: Any) -> set[str]:
    return {v} if isinstance(v, str) else set(v or [])


def check_iam_policy(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return ["top level must be a JSON object"]
    errors = []
    if doc.get("Version") != "2012-10-17":
        errors.append(f'Version must be "2012-10-17", not {doc.get("Version")!r}')
    stmts = doc.get("Statement")
    if not isinstance(stmts, list) or not stmts:
        return errors + ["Statement must be a non-empty list"]
    for i, s in enumerate(stmts):
        where = f"Statement[{i}]" + (f" ({s['Sid']})" if isinstance(s, dict) and "Sid" in s else "")
        if not isinstance(s, dict):
            errors.append(f"{where}: must be an object")
            continue
        if s.get("Effect") not in ("Allow", "Deny"):
            errors.append(f'{where}: Effect must be "Allow" or "Deny"')
        actions = s.get("Action")
        if not actions or not all(isinstance(a, str) and ":" in a for a in _as_set(actions)):
            errors.append(f"{where}: Action must name service:Action (string or non-empty list)")
        if not s.get("Resource"):
            errors.append(f"{where}: Resource is required")
    return errors


def check_iam_consistency(policy: Any, template: Any) -> list[str]:
    """deploy/iam-policy.json and the template's policy grant the same actions per Sid."""
    resource = (template.get("Resources") or {}).get(CFN_POLICY_RESOURCE)
    if not resource:
        return [f"cloudformation.yaml has no {CFN_POLICY_RESOURCE} resource"]
    cfn = {s.get("Sid"): _as_set(s.get("Action")) for s in _statements(resource["Properties"]["PolicyDocument"])}
    standalone = {s.get("Sid"): _as_set(s.get("Action")) for s in _statements(policy)}
    errors = []
    for sid in sorted(set(cfn) | set(standalone), key=str):
        if cfn.get(sid) != standalone.get(sid):
            errors.append(
                f"Sid {sid}: iam-policy.json has {sorted(standalone.get(sid, []))}, "
                f"cloudformation.yaml has {sorted(cfn.get(sid, []))}"
            )
    return errors


def check_daemon_consistency(task_def: Any, template: Any) -> list[str]:
    """The template's daemon task definition keeps the JSON one's privileges and mounts."""
    resource = (template.get("Resources") or {}).get(CFN_DAEMON_TASK_DEFINITION)
    if not resource:
        return [f"cloudformation.yaml has no {CFN_DAEMON_TASK_DEFINITION} resource"]
    props = resource["Properties"]
    c_json = task_def["containerDefinitions"][0]
    c_cfn = props["ContainerDefinitions"][0]
    pairs = [
        ("networkMode", task_def.get("networkMode"), props.get("NetworkMode")),
        ("pidMode", task_def.get("pidMode"), props.get("PidMode")),
        ("user", c_json.get("user"), c_cfn.get("User")),
        (
            "capabilities.add",
            sorted(c_json.get("linuxParameters", {}).get("capabilities", {}).get("add", [])),
            sorted(c_cfn.get("LinuxParameters", {}).get("Capabilities", {}).get("Add", [])),
        ),
        (
            "capabilities.drop",
            sorted(c_json.get("linuxParameters", {}).get("capabilities", {}).get("drop", [])),
            sorted(c_cfn.get("LinuxParameters", {}).get("Capabilities", {}).get("Drop", [])),
        ),
        (
            "mountPoints",
            sorted((m["containerPath"], m.get("readOnly", False)) for m in c_json.get("mountPoints", [])),
            sorted((m["ContainerPath"], m.get("ReadOnly", False)) for m in c_cfn.get("MountPoints", [])),
        ),
        (
            "healthCheck.command",
            c_json.get("healthCheck", {}).get("command"),
            c_cfn.get("HealthCheck", {}).get("Command"),
        ),
    ]
    return [f"{name}: task-definition-daemon.json has {a!r}, cloudformation.yaml has {b!r}" for name, a, b in pairs if a != b]


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit file: sections of repeatable `Key=value` lines."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line and current is not None:
            key, value = line.split("=", 1)
            current.setdefault(key.strip(), []).append(value.strip())
        else:
            raise ValueError(f"not a unit file line: {raw!r}")
    return sections


def check_systemd(path: Path) -> list[str]:
    unit = parse_unit(path.read_text())
    errors = []
    before = " ".join(unit.get("Unit", {}).get("Before", [])).split()
    if "ecs.service" not in before:
        errors.append("[Unit] must have Before=ecs.service (the proxy starts before the ECS agent)")
    if not unit.get("Service", {}).get("ExecStart"):
        errors.append("[Service] has no ExecStart=")
    if "always" not in unit.get("Service", {}).get("Restart", []):
        errors.append("[Service] must have Restart=always")
    if not unit.get("Install", {}).get("WantedBy"):
        errors.append("[Install] has no WantedBy=")
    return errors


def check_dockerfile(path: Path) -> list[str]:
    """Structure only (no daemon here): stages, JSON-form ENTRYPOINT/CMD of the last one."""
    lines, pending = [], ""
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not pending and (not s or s.startswith("#")):
            continue
        if s.endswith("\\"):
            pending += s[:-1] + " "
            continue
        lines.append(pending + s)
        pending = ""
    stages: list[str] = []
    final: dict[str, str] = {}
    errors = []
    for line in lines:
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            words = args.split()
            stages.append(words[2].lower() if len(words) >= 3 and words[1].lower() == "as" else str(len(stages)))
            final = {}
        elif instr == "COPY" and "--from=" in args:
            src = args.split("--from=", 1)[1].split()[0].lower()
            if src not in stages:
                errors.append(f"COPY --from={src}: no earlier stage of that name")
        elif instr in ("ENTRYPOINT", "CMD", "USER"):
            final[instr] = args
    if len(stages) < 2:
        errors.append("expected a multi-stage build (builder + runtime)")
    forms: dict[str, Any] = {}
    for instr in ("ENTRYPOINT", "CMD"):
        try:
            forms[instr] = json.loads(final.get(instr, ""))
        except ValueError:
            pass
        if not isinstance(forms.get(instr), list):
            errors.append(f"final stage {instr} must be in JSON (exec) form")
    if isinstance(forms.get("ENTRYPOINT"), list) and forms["ENTRYPOINT"] != ["/usr/local/bin/ecsmesh"]:
        errors.append('final ENTRYPOINT must be ["/usr/local/bin/ecsmesh"]')
    return errors


def _promtool(*args: str) -> list[str]:
    """Runs Debian's promtool (installed by `cargo xtask setup`); its complaints, if any."""
    import subprocess

    if not Path(PROMTOOL).is_file():
        return [f"{PROMTOOL} missing: run `cargo xtask setup` (Debian package prometheus)"]
    out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True)
    if out.returncode == 0:
        return []
    lines = [l for l in (out.stdout + out.stderr).splitlines() if l.strip()]
    return lines or [f"promtool exited {out.returncode}"]


def check_prometheus_config(path: Path) -> list[str]:
    return _promtool("check", "config", str(path))


def dashboard_queries(dash: Any) -> list[str]:
    return [t["expr"] for p in dash.get("panels", []) for t in p.get("targets", []) if "expr" in t]


def check_dashboard(dash: Any) -> list[str]:
    """Every panel query is valid PromQL: promtool checks them as recording rules."""
    import tempfile

    queries = dashboard_queries(dash)
    if not queries:
        return ["no panel has a Prometheus query"]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)
    ]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(rules, f)
    try:
        return _promtool("check", "rules", f.name)
    finally:
        Path(f.name).unlink()


# --- driver ---------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DEPLOY_DIR", file=sys.stderr)
        return 2
    root = Path(argv[1])
    if not root.is_dir():
        print(f"{argv[0]}: {root}: not a directory", file=sys.stderr)
        return 2
    c = Checker()
    parsed: dict[str, Any] = {}

    c.run("files", str(root), lambda: [f"missing {f}" for f in REQUIRED_FILES if not (root / f).is_file()])

    for path in sorted(root.glob("*.json")):
        c.run("json", path.name, lambda p=path: check_json(p, parsed))
    yamls = sorted([*root.glob("*.yaml"), *root.glob("*.yml")])
    for path in yamls:
        c.run("yaml", path.name, lambda p=path: check_yaml(p, parsed))

    for path in yamls:
        doc = parsed.get(path.name)
        if isinstance(doc, dict) and ("Resources" in doc or "AWSTemplateFormatVersion" in doc):
            c.run("cfn-lint", path.name, lambda p=path: check_cfn_lint(p))

    for path in sorted(root.glob("task-definition-*.json")):
        if path.name in parsed:
            c.run("ecs-model", path.name, lambda p=path: check_ecs_model(parsed[p.name]))
        else:
            c.result("ecs-model", path.name, ["not validated: the file does not parse as JSON"])

    daemon = parsed.get("task-definition-daemon.json")
    template = parsed.get("cloudformation.yaml")
    policy = parsed.get("iam-policy.json")
    if isinstance(daemon, dict):
        c.run("daemon-shape", "task-definition-daemon.json", lambda: check_daemon_shape(daemon))
        if isinstance(template, dict):
            c.run("daemon-consistency", "cloudformation.yaml", lambda: check_daemon_consistency(daemon, template))
    sidecar = parsed.get("task-definition-sidecar.json")
    if isinstance(sidecar, dict):
        c.run("sidecar-shape", "task-definition-sidecar.json", lambda: check_sidecar_shape(sidecar, template))
    if isinstance(template, dict):
        c.run("bootstrap-userdata", "cloudformation.yaml", lambda: check_bootstrap(template, daemon))
        c.run("issuer-service", "cloudformation.yaml", lambda: check_issuer_service(template))
    if (root / "iam-policy.json").is_file():
        c.run("iam-policy", "iam-policy.json", lambda: check_iam_policy(policy))
        if isinstance(policy, dict) and isinstance(template, dict):
            c.run("iam-consistency", "cloudformation.yaml", lambda: check_iam_consistency(policy, template))

    scrape = root / "prometheus-scrape.yml"
    if scrape.is_file():
        c.run("promtool-config", scrape.name, lambda: check_prometheus_config(scrape))
    dash = parsed.get("grafana-dashboard.json")
    if isinstance(dash, dict):
        c.run("dashboard-promql", "grafana-dashboard.json", lambda: check_dashboard(dash))

    for path in sorted(root.glob("*.service")):
        c.run("systemd", path.name, lambda p=path: check_systemd(p))
    if (root / "Dockerfile").is_file():
        c.run("dockerfile", "Dockerfile", lambda: check_dockerfile(root / "Dockerfile"))

    if c.failed:
        print(f"deploy-check: {c.failed} check(s) failed")
        return 1
    print("deploy-check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
