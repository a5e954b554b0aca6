//! `ecsmesh issuer`: the central service that holds the issuing CA key and hands node
//! proxies their node certificates and their tasks' X.509-SVIDs (wire schema:
//! [`crate::identity::protocol`]).
//!
//! Trust model (SPIRE's `aws_iid` node attestation, trust on first use):
//! - A node proves it is an EC2 instance with the instance identity document and its
//!   signature, which only AWS can make ([`attest`]). The instance must be a container
//!   instance (ACTIVE or DRAINING) of the configured ECS cluster.
//! - The document never changes for the life of an instance and anything on the instance
//!   can read it, so it is accepted **once per node-certificate lifetime**: the state file
//!   ([`state`]) records the node certificate issued for each instance, and a second
//!   attestation while it (or a renewal of it) is unexpired is refused as a replay. The
//!   node keeps its node key and renews over mTLS (`/v1/node`); a node that lost its key
//!   can attest again once its last node certificate has expired. Whoever attests first
//!   owns the instance's identity for that long — the node proxy starts at boot, before
//!   any task, which is what makes "first" the node.
//! - SVIDs are issued only to a node certificate, only for tasks ECS says run on that
//!   node's container instance, and named from what ECS says about the task (the identity
//!   template), never from anything in the request.
//! - `ecsmesh issuer deny-instance` stops all issuance to an instance; what it already
//!   holds lapses within the certificate lifetimes.
//!
//! Several replicas may share one state file (shared storage); each re-reads it when it
//! changes. Two replicas accepting the same document at the same instant is not excluded
//! (no cross-host lock); a single active replica with a standby is.
pub(crate) mod attest;
pub(crate) mod ca_source;
pub mod cli;
pub(crate) mod config;
pub(crate) mod csr;
pub(crate) mod ecs;
pub(crate) mod metrics;
mod run;
pub(crate) mod server;
pub(crate) mod service;
pub(crate) mod state;
pub(crate) mod sts;

#[cfg(test)]
mod tests;

pub use cli::IssuerCommand;
pub use config::IssuerConfig;

use crate::identity::protocol::Reason;

/// A request refused, with the reason the client, the metric and the log line get.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Refused {
    pub reason: Reason,
    pub message: String,
}

impl Refused {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}
