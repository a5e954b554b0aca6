//! Issuer mode: SVIDs asked of `ecsmesh issuer` by task ARN, kept while a task holding
//! them is here, renewed at half life, and the trust status that follows them.
use std::{sync::Arc, time::SystemTime};

use rustls_pki_types::CertificateDer;

use super::{IdentityManager, log_trust};
use crate::identity::{
    IdentityError, SpiffeId, Svid, TrustStatus,
    remote::{RemoteError, RemoteIssuer},
};

impl IdentityManager {
    /// Re-issues (file mode) or asks the issuer again for (issuer mode) every SVID at or
    /// past its refresh time, and renews the node certificate when due; returns how many
    /// SVIDs were replaced.
    pub async fn refresh_due(&self) -> usize {
        let Some(remote) = self.remote() else {
            return self.refresh_due_local();
        };
        if let Err(e) = remote.refresh_node().await {
            tracing::warn!(error = %e, "node certificate renewal failed; retrying");
        }
        let now = SystemTime::now();
        let due: Vec<(SpiffeId, Vec<String>)> = {
            let table = self.read();
            table
                .by_id
                .values()
                .filter(|s| s.refresh_at() <= now)
                .map(|s| {
                    let holders = table.holders.get(&s.id);
                    (
                        s.id.clone(),
                        holders.into_iter().flatten().cloned().collect(),
                    )
                })
                .collect()
        };
        let mut refreshed = 0;
        for (id, holders) in due {
            for arn in holders {
                match remote.svid(&arn).await {
                    Ok(svid) if svid.id == id => {
                        tracing::info!(identity = %id, serial = %svid.serial, "certificate refreshed");
                        let mut table = self.write();
                        if let Some(slot) = table.by_id.get_mut(&id) {
                            *slot = Arc::new(svid);
                            refreshed += 1;
                        }
                        break;
                    }
                    Ok(svid) => {
                        tracing::warn!(task = %arn, identity = %id, issued = %svid.id, "the issuer names this task differently now; keeping the old certificate until the task is re-enrolled");
                        break;
                    }
                    Err(e) if e.about_task() => {
                        tracing::warn!(task = %arn, identity = %id, error = %e, "the issuer refuses this task; trying another holder");
                    }
                    Err(e) => {
                        tracing::warn!(identity = %id, error = %e, "certificate refresh failed; retrying with backoff");
                        break;
                    }
                }
            }
        }
        self.remote_issued(remote);
        refreshed
    }

    /// Issuer mode: the SVID of the ECS task `task_arn`, asked of the issuer (which names
    /// it from what ECS says); the identity is kept while any task holding it is here.
    pub async fn obtain(&self, task_arn: &str) -> Result<Arc<Svid>, RemoteError> {
        let Some(remote) = self.remote() else {
            return Err(IdentityError::invalid(task_arn, "not in issuer mode").into());
        };
        let svid = Arc::new(remote.svid(task_arn).await?);
        let svid = {
            let mut table = self.write();
            let id = svid.id.clone();
            table
                .holders
                .entry(id.clone())
                .or_default()
                .insert(task_arn.to_owned());
            table.by_sni.insert(id.sni(), id.clone());
            table.by_id.insert(id, svid.clone());
            svid
        };
        self.remote_issued(remote);
        self.changed.notify_one();
        Ok(svid)
    }

    /// Issuer mode: the task `task_arn` no longer holds `id`; the SVID goes with the last
    /// holder.
    pub fn release(&self, id: &SpiffeId, task_arn: &str) {
        let mut table = self.write();
        let empty = table.holders.get_mut(id).is_some_and(|h| {
            h.remove(task_arn);
            h.is_empty()
        });
        if empty {
            table.holders.remove(id);
            table.by_id.remove(id);
            table.by_sni.remove(&id.sni());
        }
    }

    /// Issuer mode: the chain of the oldest certificate held (SVIDs and the node
    /// certificate). `/trust` reports its issuing CA, so an anchor is retired only once
    /// everything the node holds was re-issued under the new one.
    pub(super) fn oldest_chain(
        &self,
        remote: &RemoteIssuer,
    ) -> Option<Vec<CertificateDer<'static>>> {
        let table = self.read();
        table
            .by_id
            .values()
            .map(|s| (s.not_before, s.chain.clone()))
            .chain(remote.node_chain())
            .min_by_key(|(at, _)| *at)
            .map(|(_, chain)| chain)
    }

    /// After an issuance in issuer mode: the trust status follows the issuing CA of the
    /// oldest certificate held.
    pub(super) fn remote_issued(&self, remote: &RemoteIssuer) {
        let status =
            TrustStatus::of_remote(&self.bundle.load(), self.oldest_chain(remote).as_deref());
        if status != **self.status.load() {
            self.publish(status, "issuer mode: issuing CA seen");
        }
    }

    pub(super) fn publish(&self, status: TrustStatus, message: &str) {
        log_trust(&status, message);
        for observe in self
            .observers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            observe(&status);
        }
        self.status.store(Arc::new(status));
    }
}
