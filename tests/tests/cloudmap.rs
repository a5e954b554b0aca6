//! Cloud Map discovery and the `ecsmesh.ready` attribute end to end: moto (the AWS API
//! emulator, installed in the project's venv) runs inside instance 1's netns; both node
//! proxies discover the meshed endpoint from it, and instance 1's proxy publishes its
//! readiness attribute there.
mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use common::{mesh::TRUST_DOMAIN, *};
use harness::{
    NetworkMode::Host,
    ProxyOptions, World,
    metrics::counter,
    process::{self, Placement},
};
use serde_json::{Value, json};

const MOTO_PORT: u16 = 5000;

/// One AWS API call to moto from inside instance 1's netns. moto routes on the service in
/// the credential scope and does not check signatures.
fn aws(w: &World, service: &str, target: Option<&str>, body: String, form: bool) -> String {
    let addr: SocketAddr = format!("127.0.0.1:{MOTO_PORT}").parse().unwrap();
    let (service, target) = (service.to_owned(), target.map(str::to_owned));
    w.instances[1].netns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("moto");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let ctype = if form { "application/x-www-form-urlencoded" } else { "application/x-amz-json-1.1" };
        let mut req = format!(
            "POST / HTTP/1.1\r\nHost: 127.0.0.1:{MOTO_PORT}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\
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
        assert!(resp.starts_with("HTTP/1.1 200"), "{service} {resp}");
        resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
    })
}

fn sd(w: &World, op: &str, body: Value) -> Value {
    let text = aws(
        w,
        "servicediscovery",
        Some(&format!("Route53AutoNaming_v20170314.{op}")),
        body.to_string(),
        false,
    );
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn ecs(w: &World, op: &str, body: Value) -> Value {
    let text = aws(
        w,
        "ecs",
        Some(&format!("AmazonEC2ContainerServiceV20141113.{op}")),
        body.to_string(),
        false,
    );
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn cloudmap_endpoints_drive_the_tunnel_and_the_ready_attribute_is_published() {
    let mut w = World::new(tools(), 2);
    w.enable_mesh(TRUST_DOMAIN);
    w.add_task(0, Host, 1);
    w.add_task(1, Host, 1);
    w.instances[1].tasks[0].family = "orders".into();
    let ep = w.instances[1].addr(9000);
    w.instances[1].echo_server(&[ep]);

    // moto inside instance 1, reachable by both instances.
    let moto_bin = format!(
        "{}/../target/pyenv/bin/moto_server",
        env!("CARGO_MANIFEST_DIR")
    );
    assert!(
        std::path::Path::new(&moto_bin).exists(),
        "run `cargo xtask deploy-check` first (creates target/pyenv)"
    );
    let cg = w.cgroups.dir("inst1/moto");
    let mut cmd = std::process::Command::new(&moto_bin);
    cmd.args(["-H", "0.0.0.0", "-p", &MOTO_PORT.to_string()]);
    process::place(
        &mut cmd,
        &Placement {
            netns: w.instances[1].netns.path(),
            cgroup: cg,
            cpu: None,
        },
    );
    let mut moto = process::spawn_logged(cmd, "moto", &w.workdir.join("moto.log"));
    let moto_addr: SocketAddr = format!("127.0.0.1:{MOTO_PORT}").parse().unwrap();
    wait_until("moto listening", || {
        w.instances[1]
            .netns
            .run(move || TcpStream::connect_timeout(&moto_addr, Duration::from_millis(200)).is_ok())
    });

    // Cloud Map: namespace, service, one instance registered the way ECS registers tasks.
    sd(&w, "CreateHttpNamespace", json!({ "Name": "mesh.local" }));
    let ns = sd(&w, "ListNamespaces", json!({}))["Namespaces"][0]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    let svc = sd(
        &w,
        "CreateService",
        json!({ "Name": "orders", "NamespaceId": ns }),
    )["Service"]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    let attrs = json!({ "AWS_INSTANCE_IPV4": "10.0.0.2", "AWS_INSTANCE_PORT": "9000", "ECS_TASK_DEFINITION_FAMILY": "orders" });
    // ECS registers a service's tasks under their task id.
    let task_id = w.instances[1].tasks[0].id.clone();
    sd(
        &w,
        "RegisterInstance",
        json!({ "ServiceId": svc, "InstanceId": task_id, "Attributes": attrs }),
    );

    // ECS: a cluster and a container instance (moto wants an EC2 instance behind it).
    ecs(&w, "CreateCluster", json!({ "clusterName": "prod" }));
    let xml = aws(
        &w,
        "ec2",
        None,
        "Action=RunInstances&ImageId=ami-12c6146b&MinCount=1&MaxCount=1&Version=2016-11-15".into(),
        true,
    );
    let ec2_id = xml
        .split("<instanceId>")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .expect("ec2 instance id")
        .to_owned();
    let doc =
        json!({ "instanceId": ec2_id, "region": "us-east-1", "availabilityZone": "us-east-1a" })
            .to_string();
    let ci = ecs(
        &w,
        "RegisterContainerInstance",
        json!({ "cluster": "prod", "instanceIdentityDocument": doc }),
    );
    let ci_arn = ci["containerInstance"]["containerInstanceArn"]
        .as_str()
        .expect("container instance arn")
        .to_owned();

    // The ECS agent of instance 1 reports that cluster and container instance.
    let agent = harness::fixture::HttpFixture::tcp_in(
        &w.instances[1].netns,
        "127.0.0.1:51678".parse().unwrap(),
    );
    agent.set("/v1/metadata", 200, json!({ "Cluster": "prod", "ContainerInstanceArn": ci_arn, "Version": "Amazon ECS Agent - v1.89.2" }).to_string());
    agent.set("/v1/tasks", 200, json!({ "Tasks": [] }).to_string());

    let cloudmap = |endpoint: &str| {
        format!(
            "\n[cloudmap]\nnamespace = \"mesh.local\"\nservices = [\"orders\"]\nrefresh_ms = 300\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n"
        )
    };
    let b_extra = format!(
        "{}\n[ecs]\ncgroup_root = \"{}\"\nlayout = \"v2\"\npoll_interval_ms = 500\npublish_ready_attribute = true\naws_endpoint = \"http://127.0.0.1:{MOTO_PORT}\"\nregion = \"us-east-1\"\n",
        cloudmap(&format!("http://127.0.0.1:{MOTO_PORT}")),
        w.instances[1].cgroup_root.display()
    );
    w.instances[1].start_proxy(&ProxyOptions {
        extra_toml: b_extra,
        ..Default::default()
    });
    w.instances[0].start_proxy(&ProxyOptions {
        extra_toml: cloudmap(&format!("http://10.0.0.2:{MOTO_PORT}")),
        ..Default::default()
    });

    // Ready published the attribute.
    let listed = ecs(
        &w,
        "ListAttributes",
        json!({ "cluster": "prod", "targetType": "container-instance", "attributeName": "ecsmesh.ready", "attributeValue": "true" }),
    );
    assert_eq!(
        listed["attributes"].as_array().map_or(0, Vec::len),
        1,
        "{listed}"
    );

    // The Cloud Map instance is a meshed endpoint: the task's connection is tunnelled.
    let a = &w.instances[0];
    assert_redirected(&a.tasks[0].client(&[ep], 1, 1000), a.outbound_v4(Host));
    let handshakes = |m: &prometheus_parse::Scrape| {
        counter(m, "ecsmesh_tls_handshakes_total", &[("role", "client")])
    };
    assert_eq!(handshakes(&a.metrics()), 1.0);

    // API outage: the last good set stays, the errors are counted.
    moto.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = moto.wait_timeout(Duration::from_secs(5));
    wait_until("refresh errors counted", || {
        counter(
            &a.metrics(),
            "ecsmesh_cloudmap_refresh_total",
            &[("result", "error")],
        ) >= 1.0
    });
    assert_eq!(
        counter(&a.metrics(), "ecsmesh_cloudmap_endpoints", &[]),
        1.0
    );
    let streams_before = counter(
        &w.instances[1].metrics(),
        "ecsmesh_tunnel_inbound_streams_total",
        &[],
    );
    assert!(a.tasks[0].client(&[ep], 1, 100)[0].ok);
    let streams_after = counter(
        &w.instances[1].metrics(),
        "ecsmesh_tunnel_inbound_streams_total",
        &[],
    );
    assert_eq!(
        streams_after,
        streams_before + 1.0,
        "still tunnelled during the outage"
    );
}
