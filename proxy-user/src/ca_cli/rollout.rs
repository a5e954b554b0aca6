//! Asking the node proxies what they trust before a rotation step: each node serves its
//! anchors' and issuer's fingerprints on the admin route `/trust`.
use std::{fmt, str::FromStr, time::Duration};

use crate::{ecs::client::get_json, identity::TrustStatus};

use super::CaCliError;

/// How long one node may take to answer; an unreachable node fails the check (it may be
/// the one that has not reloaded).
const NODE_TIMEOUT: Duration = Duration::from_secs(5);
const BODY_LIMIT: usize = 64 << 10;

/// A node proxy's admin base URL, `http://host:port` (no path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeUrl {
    host: String,
    port: u16,
}

impl FromStr for NodeUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "{s:?}: a node's admin URL starts with http:// (the admin port serves plain HTTP)"
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "{s:?}: give the admin base URL only (http://host:port); /trust is added"
            ));
        }
        let host = uri.host().ok_or_else(|| format!("{s:?}: no host"))?;
        let port = uri
            .port_u16()
            .ok_or_else(|| format!("{s:?}: no port (the admin port, e.g. :15000)"))?;
        Ok(NodeUrl {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
        })
    }
}

impl fmt::Display for NodeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{}:{}", self.host, self.port)
        }
    }
}

/// `GET <node>/trust`.
pub fn fetch(node: &NodeUrl) -> Result<TrustStatus, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let endpoint = format!("GET {node}/trust");
    let authority = node.to_string()["http://".len()..].to_owned();
    rt.block_on(get_json(
        &endpoint,
        tokio::net::TcpStream::connect((node.host.as_str(), node.port)),
        &authority,
        "/trust",
        NODE_TIMEOUT,
        BODY_LIMIT,
    ))
    .map_err(|e| e.to_string())
}

/// Asks every node; `problem` says what is wrong with one node's state, if anything.
/// Fails naming every node that is unreachable or not ready for `step`.
pub(super) fn check(
    nodes: &[NodeUrl],
    step: &'static str,
    problem: impl Fn(&TrustStatus) -> Option<String>,
) -> Result<(), CaCliError> {
    let mut problems = Vec::new();
    for node in nodes {
        match fetch(node) {
            Ok(status) => {
                if let Some(p) = problem(&status) {
                    let who = status
                        .issuer
                        .as_ref()
                        .map_or("no issuer yet".to_owned(), |i| i.identity.to_string());
                    problems.push(format!("node {node} ({who}) {p}"));
                }
            }
            Err(e) => problems.push(format!("node {node} did not answer: {e}")),
        }
    }
    if problems.is_empty() {
        for node in nodes {
            println!("node {node}: ready to {step}");
        }
        Ok(())
    } else {
        Err(CaCliError::NodesNotReady {
            step,
            problems: problems.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::NodeUrl;

    #[test]
    fn node_urls_parse_or_say_what_is_wrong() {
        let n: NodeUrl = "http://10.0.0.2:15000".parse().unwrap();
        assert_eq!(n.to_string(), "http://10.0.0.2:15000");
        let n: NodeUrl = "http://[fd00::2]:15000/".parse().unwrap();
        assert_eq!(n.to_string(), "http://[fd00::2]:15000");
        for (bad, says) in [
            ("https://10.0.0.2:15000", "http://"),
            ("http://10.0.0.2", "no port"),
            ("http://10.0.0.2:15000/trust", "base URL"),
            ("not a url", "not a URL"),
        ] {
            let err = bad.parse::<NodeUrl>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
