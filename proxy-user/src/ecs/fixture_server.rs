//! Test-only stand-ins for the ECS agent and Docker: tiny hyper servers (TCP on
//! 127.0.0.1:0, a Unix socket in a temp dir) that answer with the fixture files in
//! `tests/fixtures/ecs/` by request path — real HTTP, so the clients are tested as they
//! run against the real daemons.
use std::{
    collections::HashMap,
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{DockerHealth, EcsAgent};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ecs");

/// A directory under the system temp dir, removed on drop (no `tempfile` dependency).
pub(crate) struct TempTree(PathBuf);

impl TempTree {
    pub(crate) fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ecsmesh-ecs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
    pub(crate) fn mkdir(&self, rel: &str) {
        std::fs::create_dir_all(self.0.join(rel)).unwrap();
    }
    pub(crate) fn touch(&self, rel: &str) {
        std::fs::write(self.0.join(rel), b"").unwrap();
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the fixture server answers for a path.
#[derive(Clone)]
pub(crate) enum Reply {
    /// A fixture file, 200 application/json.
    File(&'static str),
    /// A literal body with a status.
    Body(u16, &'static str),
    /// Never answer (the client's deadline must fire).
    Hang,
}

#[derive(Default)]
pub(crate) struct Server {
    routes: HashMap<String, Reply>,
    /// Paths requested, in order, to check what the client asked for.
    seen: Mutex<Vec<String>>,
}

impl Server {
    pub(crate) fn new(routes: &[(&str, Reply)]) -> Arc<Self> {
        Arc::new(Self {
            routes: routes
                .iter()
                .map(|(p, r)| (p.to_string(), r.clone()))
                .collect(),
            seen: Mutex::default(),
        })
    }

    pub(crate) fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    async fn answer(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        assert!(
            req.headers().contains_key(hyper::header::HOST),
            "HTTP/1.1 needs Host"
        );
        self.seen.lock().unwrap().push(path.clone());
        let (status, body) = match self.routes.get(&path) {
            Some(Reply::File(name)) => {
                (200, std::fs::read(Path::new(FIXTURES).join(name)).unwrap())
            }
            Some(Reply::Body(status, body)) => (*status, body.as_bytes().to_vec()),
            Some(Reply::Hang) => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                unreachable!()
            }
            // Docker's answer for an unknown container; the agent's is similar.
            None => (
                404,
                format!(r#"{{"message":"No such container: {path}"}}"#).into_bytes(),
            ),
        };
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    }

    fn spawn_conn<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(self: &Arc<Self>, io: S) {
        let me = self.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let me = me.clone();
                async move { Ok::<_, Infallible>(me.answer(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), svc)
                .await;
        });
    }
}

/// The fake agent on 127.0.0.1:<ephemeral>; returns a client for it.
pub(crate) async fn agent_server(server: &Arc<Server>) -> EcsAgent {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = server.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            server.spawn_conn(s);
        }
    });
    EcsAgent::new(format!("http://{addr}").parse().unwrap()).unwrap()
}

/// The fake Docker on `<tmp>/docker.sock`; the tree must outlive the client.
pub(crate) async fn docker_server(server: &Arc<Server>) -> (TempTree, DockerHealth) {
    let dir = TempTree::new();
    let sock = dir.path().join("docker.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let server = server.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            server.spawn_conn(s);
        }
    });
    (dir, DockerHealth::new(sock))
}
