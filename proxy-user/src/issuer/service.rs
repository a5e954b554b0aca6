//! The issuing decisions, without HTTP: attest, renew a node certificate, issue a task
//! SVID. Each returns the certificate or a [`Refused`] with the reason; the server turns
//! that into the response, the metric and the log line.
use std::{collections::HashSet, sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, UnixTime};

use super::{
    Refused,
    attest::IidVerifier,
    ca_source::Authority,
    config::is_instance_id,
    csr::{self, CsrKey},
    ecs::{ContainerInstance, EcsView, Task, TaskDefinition},
    state::{InstanceRecord, StateFile, unix_secs},
    sts::{self, Sts},
};
use crate::identity::{
    IdentityTemplate, Rejection, SpiffeId, TemplateVars, TrustDomain, Usage,
    protocol::{
        AttestRequest, Issued, NodeRenewRequest, RESERVED_PREFIX, Reason, SvidRequest,
        TaskAttestRequest, binding, issuer_id, node_id, node_instance_of,
    },
    verify::CertInfo,
    verify_peer,
};

/// Container instance states that may hold identities (DRAINING still runs tasks).
const LIVE_INSTANCE: [&str; 2] = ["ACTIVE", "DRAINING"];
/// Task states between placement and the end of shutdown.
const LIVE_TASK: [&str; 5] = [
    "PENDING",
    "ACTIVATING",
    "RUNNING",
    "DEACTIVATING",
    "STOPPING",
];

pub struct Service {
    pub td: TrustDomain,
    pub cluster: String,
    pub template: IdentityTemplate,
    pub svid_lifetime: Duration,
    pub node_lifetime: Duration,
    pub authority: Arc<Authority>,
    pub iid: IidVerifier,
    pub state: StateFile,
    /// From the config; merged with the state file's list.
    pub denied: HashSet<String>,
    pub ecs: Arc<dyn EcsView>,
    /// Task-role attestation: the STS endpoint signed requests must be for, and STS.
    pub sts: Option<(http::Uri, Arc<dyn Sts>)>,
}

/// Who a request turned out to be about, for the log line.
#[derive(Debug, Default, Clone)]
pub struct Subject {
    pub instance: Option<String>,
    pub task: Option<String>,
}

impl Service {
    /// `POST /v1/attest`.
    pub async fn attest(&self, req: AttestRequest, who: &mut Subject) -> Result<Issued, Refused> {
        let doc = self.iid.verify(&req.document, &req.signature)?;
        let instance = doc.instance_id;
        who.instance = Some(instance.clone());
        let key = csr::check(&req.csr)?;
        self.check_not_denied(&instance)?;
        let ci = self.live_instance(&instance).await?;
        self.record_node(&instance, &ci, &key, true)
    }

    /// `POST /v1/node`: a fresh node certificate for the holder of a valid one.
    pub async fn renew_node(
        &self,
        peer: Option<&[CertificateDer<'static>]>,
        req: NodeRenewRequest,
        who: &mut Subject,
    ) -> Result<Issued, Refused> {
        let instance = self.authenticate(peer)?;
        who.instance = Some(instance.clone());
        let key = csr::check(&req.csr)?;
        self.check_not_denied(&instance)?;
        let ci = self.live_instance(&instance).await?;
        self.record_node(&instance, &ci, &key, false)
    }

    /// Under the state lock: the deny list again (it may have changed since the check
    /// above), for an attestation the replay check, then a node certificate and the
    /// instance's record (`attested_at` kept across renewals).
    fn record_node(
        &self,
        instance: &str,
        ci: &ContainerInstance,
        key: &CsrKey,
        attestation: bool,
    ) -> Result<Issued, Refused> {
        let now = std::time::SystemTime::now();
        self.state.update(|s| {
            if s.denied.contains(instance) {
                return Err(denied(instance));
            }
            if attestation && s.holds_node_cert(instance, now) {
                return Err(Refused::new(
                    Reason::ReplayedAttestation,
                    format!(
                        "{instance} already holds an unexpired node certificate; renew it over mTLS \
                         ({}) or attest again after it expires",
                        crate::identity::protocol::NODE_PATH
                    ),
                ));
            }
            let (issued, info) = self.issue_node(instance, key)?;
            let attested_at = match s.instances.get(instance) {
                Some(r) if !attestation => r.attested_at,
                _ => unix_secs(now),
            };
            s.instances.insert(
                instance.to_owned(),
                InstanceRecord {
                    container_instance_arn: ci.arn.clone(),
                    node_cert_serial: info.serial,
                    node_cert_not_after: unix_secs(info.not_after),
                    attested_at,
                },
            );
            Ok(issued)
        })
    }

    /// `POST /v1/svid`: an SVID for a task ECS places on the requesting node's instance.
    pub async fn svid(
        &self,
        peer: Option<&[CertificateDer<'static>]>,
        req: SvidRequest,
        who: &mut Subject,
    ) -> Result<Issued, Refused> {
        let instance = self.authenticate(peer)?;
        who.instance = Some(instance.clone());
        who.task = Some(req.task_arn.clone());
        let key = csr::check(&req.csr)?;
        self.check_not_denied(&instance)?;
        if !is_task_arn(&req.task_arn) {
            return Err(Refused::new(Reason::UnknownTask, "not an ECS task ARN"));
        }
        let ci = self.live_instance(&instance).await?;
        let task = self.task(&req.task_arn).await?;
        if task.container_instance_arn.as_deref() != Some(ci.arn.as_str()) {
            return Err(Refused::new(
                Reason::NotOnInstance,
                format!("the task does not run on {instance} ({})", ci.arn),
            ));
        }
        if !LIVE_TASK.contains(&task.last_status.as_str()) {
            return Err(Refused::new(
                Reason::TaskNotRunning,
                format!("the task is {}", task.last_status),
            ));
        }
        let def = self.definition(&task).await?;
        let id = self.task_identity(&task, def)?;
        self.issue(&id, &key, self.svid_lifetime)
            .map(|(issued, _)| issued)
    }

    /// `POST /v1/task`: an SVID for a task that proves itself with its own IAM role (a
    /// signed `sts:GetCallerIdentity`, see [`sts`]).
    pub async fn task_svid(
        &self,
        req: TaskAttestRequest,
        who: &mut Subject,
    ) -> Result<Issued, Refused> {
        who.task = Some(req.task_arn.clone());
        let Some((sts_url, sts)) = &self.sts else {
            return Err(Refused::new(
                Reason::BadRequest,
                "task-role attestation is off at this issuer (set sts_url or region)",
            ));
        };
        let key = csr::check(&req.csr)?;
        if !is_task_arn(&req.task_arn) {
            return Err(Refused::new(Reason::UnknownTask, "not an ECS task ARN"));
        }
        let expected = binding(&issuer_id(&self.td), &req.csr);
        sts::check(&req.sts, sts_url, &expected, std::time::SystemTime::now())?;
        let (status, body) = sts
            .send(&req.sts)
            .await
            .map_err(|e| Refused::new(Reason::StsUnavailable, e))?;
        let caller = sts::caller(status, &body)?;
        let task_id = req.task_arn.rsplit('/').next().unwrap_or_default();
        if caller.session != task_id {
            return Err(Refused::new(
                Reason::NotTaskCredentials,
                format!(
                    "the credentials are of role session {}/{}, not of task {task_id}",
                    caller.role, caller.session
                ),
            ));
        }
        let task = self.task(&req.task_arn).await?;
        if !LIVE_TASK.contains(&task.last_status.as_str()) {
            return Err(Refused::new(
                Reason::TaskNotRunning,
                format!("the task is {}", task.last_status),
            ));
        }
        let def = self.definition(&task).await?;
        let role = def.task_role_arn.as_deref().unwrap_or_default();
        let same = role.split(':').nth(4) == Some(caller.account.as_str())
            && role
                .split(':')
                .nth(5)
                .is_some_and(|r| r.starts_with("role/"))
            && role.rsplit('/').next() == Some(caller.role.as_str());
        if !same {
            return Err(Refused::new(
                Reason::RoleMismatch,
                format!(
                    "the task's role is {role:?}, the credentials are of {}:{}",
                    caller.account, caller.role
                ),
            ));
        }
        let id = self.task_identity(&task, def)?;
        self.issue(&id, &key, self.svid_lifetime)
            .map(|(issued, _)| issued)
    }

    async fn task(&self, arn: &str) -> Result<Task, Refused> {
        self.ecs
            .task(arn)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| {
                Refused::new(
                    Reason::UnknownTask,
                    format!("ECS does not know the task in cluster {}", self.cluster),
                )
            })
    }

    async fn definition(&self, task: &Task) -> Result<TaskDefinition, Refused> {
        self.ecs
            .task_definition(&task.task_definition_arn)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| {
                Refused::new(Reason::UnknownTask, "ECS does not know its task definition")
            })
    }

    /// A task's identity, rendered from what ECS says about it (never from the caller).
    fn task_identity(&self, task: &Task, def: TaskDefinition) -> Result<SpiffeId, Refused> {
        let vars = TemplateVars {
            trust_domain: self.td.clone(),
            cluster: self.cluster.clone(),
            family: def.family,
            service: task
                .group
                .as_deref()
                .and_then(|g| g.strip_prefix("service:"))
                .map(str::to_owned),
            task_role: def
                .task_role_arn
                .as_deref()
                .and_then(|arn| arn.rsplit('/').next())
                .filter(|name| !name.is_empty())
                .map(str::to_owned),
        };
        let id = self
            .template
            .render(&vars)
            .map_err(|e| Refused::new(Reason::NoIdentity, e.to_string()))?;
        check_workload_id(&id, &self.td)?;
        Ok(id)
    }

    /// The EC2 instance a valid node certificate names.
    fn authenticate(&self, peer: Option<&[CertificateDer<'static>]>) -> Result<String, Refused> {
        let Some([leaf, intermediates @ ..]) = peer else {
            return Err(Refused::new(
                Reason::NoNodeCertificate,
                "this endpoint needs the node certificate as TLS client certificate",
            ));
        };
        let bundle = self.authority.bundle();
        let id = verify_peer(
            &bundle,
            std::slice::from_ref(&self.td),
            leaf,
            intermediates,
            UnixTime::now(),
            Usage::Client,
        )
        .map_err(|r| match r {
            Rejection::TrustDomain(_) | Rejection::AnchorDomain { .. } => {
                Refused::new(Reason::ForeignTrustDomain, r.to_string())
            }
            other => Refused::new(Reason::BadNodeCertificate, other.to_string()),
        })?;
        match node_instance_of(&id) {
            Some(instance) if is_instance_id(instance) => Ok(instance.to_owned()),
            _ => Err(Refused::new(
                Reason::NotANodeCertificate,
                format!("{id} is not a node certificate"),
            )),
        }
    }

    fn check_not_denied(&self, instance: &str) -> Result<(), Refused> {
        let state = self.state.read().map_err(internal)?;
        if self.denied.contains(instance) || state.denied.contains(instance) {
            return Err(denied(instance));
        }
        Ok(())
    }

    async fn live_instance(&self, instance: &str) -> Result<ContainerInstance, Refused> {
        match self
            .ecs
            .container_instance(instance)
            .await
            .map_err(unavailable)?
        {
            Some(ci) if LIVE_INSTANCE.contains(&ci.status.as_str()) => Ok(ci),
            Some(ci) => Err(Refused::new(
                Reason::NotInCluster,
                format!("{instance} is {} in cluster {}", ci.status, self.cluster),
            )),
            None => Err(Refused::new(
                Reason::NotInCluster,
                format!(
                    "{instance} is not a container instance of cluster {}",
                    self.cluster
                ),
            )),
        }
    }

    fn issue_node(&self, instance: &str, key: &CsrKey) -> Result<(Issued, CertInfo), Refused> {
        let id = node_id(&self.td, instance).map_err(internal)?;
        self.issue(&id, key, self.node_lifetime)
    }

    fn issue(
        &self,
        id: &SpiffeId,
        key: &CsrKey,
        lifetime: Duration,
    ) -> Result<(Issued, CertInfo), Refused> {
        let chain = self
            .authority
            .issuer()
            .issue_for_key(id, key, lifetime)
            .map_err(internal)?;
        let info = CertInfo::parse(&chain[0]).map_err(internal)?;
        let chain = chain
            .iter()
            .map(|c| {
                pem::encode_config(
                    &pem::Pem::new("CERTIFICATE", c.to_vec()),
                    pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
                )
            })
            .collect();
        let issued = Issued {
            spiffe_id: id.to_string(),
            chain,
        };
        Ok((issued, info))
    }
}

/// A workload identity must be of our trust domain and outside `/ecsmesh/`.
pub fn check_workload_id(id: &SpiffeId, td: &TrustDomain) -> Result<(), Refused> {
    if id.trust_domain() != td {
        return Err(Refused::new(
            Reason::NoIdentity,
            format!("{id} is outside trust domain {td}"),
        ));
    }
    if id.path().starts_with(RESERVED_PREFIX) {
        return Err(Refused::new(
            Reason::NoIdentity,
            format!("{id} is under the mesh's reserved path {RESERVED_PREFIX}"),
        ));
    }
    Ok(())
}

/// `arn:<partition>:ecs:<region>:<account>:task/...`, of plain characters.
fn is_task_arn(s: &str) -> bool {
    s.len() <= 512
        && s.starts_with("arn:")
        && s.split(':').nth(2) == Some("ecs")
        && s.split(':').nth(5).is_some_and(|r| r.starts_with("task/"))
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":/-_.".contains(&b))
}

fn denied(instance: &str) -> Refused {
    Refused::new(
        Reason::DeniedInstance,
        format!("{instance} is on the deny list"),
    )
}

fn unavailable(e: impl std::fmt::Display) -> Refused {
    Refused::new(Reason::EcsUnavailable, e.to_string())
}

fn internal(e: impl std::fmt::Display) -> Refused {
    Refused::new(Reason::Internal, e.to_string())
}

impl From<super::state::StateError> for Refused {
    fn from(e: super::state::StateError) -> Self {
        internal(e)
    }
}
