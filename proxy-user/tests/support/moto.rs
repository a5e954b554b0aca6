//! moto (`moto_server`, a local AWS) from the project's venv on a free loopback port,
//! killed on drop. The venv is made by `cargo xtask deploy-check` (pinned in
//! `xtask/requirements.txt`), which `cargo xtask test` runs before the tests.
//!
//! Not a mock of our own: the requests are the SDK's real wire format and moto implements
//! the services' semantics. What moto does not cover is done here with raw requests (one
//! EC2 `RunInstances`, because ECS `RegisterContainerInstance` in moto needs an EC2 instance
//! and the EC2 SDK crate alone would double the test build time).
#![allow(dead_code)] // Each test binary uses a different part of the helper.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// moto imports all of its services at start; a loaded CI machine needs a few seconds.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at a free port (another process may take the port between probe and bind).
const START_ATTEMPTS: usize = 3;

pub const REGION: &str = "us-east-1";

pub struct Moto {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
}

impl Moto {
    /// Start moto on 127.0.0.1 and wait until it accepts connections.
    pub fn start() -> Self {
        let server = moto_server();
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let log = std::env::temp_dir()
                .join(format!("ecsmesh-moto-{}-{port}.log", std::process::id()));
            let log_file = std::fs::File::create(&log).expect("moto log file");
            let child = Command::new(&server)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("moto log file"))
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", server.display()));
            let mut moto = Moto {
                child: Some(child),
                addr,
                log,
            };
            if moto.wait_ready() {
                return moto;
            }
            last_log = moto.log_text();
            moto.stop();
        }
        panic!("moto_server did not start in {START_ATTEMPTS} attempts; last log:\n{last_log}");
    }

    /// `http://127.0.0.1:PORT`, the SDK endpoint override.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kill moto now (an API outage); idempotent. Its state is gone with it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                return false;
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// POST a raw request body to moto and return (status, body). `target` is the JSON
    /// protocols' `X-Amz-Target`; `service` picks moto's backend through the credential
    /// scope of an (unverified) SigV4 `Authorization` header, as the real SDKs send it.
    pub async fn post(
        &self,
        service: &str,
        content_type: &str,
        target: Option<&str>,
        body: &str,
    ) -> (u16, String) {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect to moto");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("HTTP/1.1 handshake with moto");
        tokio::spawn(conn);
        let mut request = hyper::Request::post("/")
            .header(hyper::header::HOST, self.addr.to_string())
            .header(hyper::header::CONTENT_TYPE, content_type)
            .header(
                hyper::header::AUTHORIZATION,
                format!(
                    "AWS4-HMAC-SHA256 Credential=test/20260101/{REGION}/{service}/aws4_request, \
                     SignedHeaders=host, Signature=0"
                ),
            );
        if let Some(target) = target {
            request = request.header("x-amz-target", target);
        }
        let response = sender
            .send_request(
                request
                    .body(Full::new(Bytes::from(body.to_owned())))
                    .expect("request"),
            )
            .await
            .expect("moto response");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("moto body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Launch one EC2 instance (EC2 query API) and return its id.
    pub async fn run_ec2_instance(&self) -> String {
        let (status, body) = self
            .post(
                "ec2",
                "application/x-www-form-urlencoded",
                None,
                "Action=RunInstances&Version=2016-11-15&ImageId=ami-12c6146b&MinCount=1&MaxCount=1",
            )
            .await;
        assert_eq!(status, 200, "RunInstances: {body}");
        let start = body
            .find("<instanceId>")
            .unwrap_or_else(|| panic!("no instanceId in {body}"))
            + "<instanceId>".len();
        let end = start + body[start..].find('<').expect("closing tag");
        body[start..end].to_owned()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- moto log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn moto_server() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/moto_server");
    if !path.is_file() {
        panic!(
            "{} is missing: run `cargo xtask deploy-check` (creates target/pyenv)",
            path.display()
        );
    }
    path
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("probe a free loopback port")
        .port()
}
