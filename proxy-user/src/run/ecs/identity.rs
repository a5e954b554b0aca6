//! Which identity an ECS task gets: rendered here (file mode) or issued by the issuer for
//! the task's ARN (issuer mode), with a backoff for tasks still waiting for one.
use std::sync::Arc;

use super::{RETRY_FIRST, RETRY_MAX, Reconciler};
use crate::{identity::SpiffeId, proxy::ExpectedIdentity, types::TaskId};

impl Reconciler {
    /// File mode: the task's identity rendered from the template (a task it cannot be
    /// rendered for is reported once and gets none).
    pub(super) fn render(
        &mut self,
        id: &TaskId,
        family: &str,
        expected: Arc<ExpectedIdentity>,
    ) -> Option<SpiffeId> {
        match expected.render_family(family) {
            Ok(identity) => Some(identity),
            Err(e) => {
                if self.reported_no_identity.insert(id.clone()) {
                    tracing::warn!(task = %id, family, error = %e, "no identity for this task: the identity template needs what the ECS agent does not report; the task stays redirected and its meshed connections fail (no_identity)");
                }
                None
            }
        }
    }

    /// A new task's identity: rendered here (file mode) or issued by the issuer for its
    /// ARN (issuer mode). None means the task is enrolled without one (no_identity).
    pub(super) async fn identity_for(
        &mut self,
        id: &TaskId,
        arn: &str,
        family: &str,
    ) -> Option<SpiffeId> {
        let (manager, expected) = self.identities.clone()?;
        if manager.remote().is_none() {
            return self.render(id, family, expected);
        }
        match manager.obtain(arn).await {
            Ok(svid) => {
                tracing::info!(task = %id, identity = %svid.id, serial = %svid.serial, "certificate issued by the issuer");
                Some(svid.id.clone())
            }
            Err(e) => {
                self.identity_retry.insert(
                    id.clone(),
                    (std::time::Instant::now() + RETRY_FIRST, RETRY_FIRST),
                );
                if self.reported_no_identity.insert(id.clone()) {
                    tracing::warn!(task = %id, error = %e, "no certificate from the issuer; the task stays redirected, its meshed connections fail (no_identity) until one is issued");
                }
                None
            }
        }
    }

    /// Issuer mode: asks again for an enrolled task's identity when it has none and its
    /// backoff is over; on success the task gets it (and its meshed connections work).
    pub(super) async fn retry_identity(&mut self, id: &TaskId, arn: &str, index: u32) {
        let Some((at, backoff)) = self.identity_retry.get(id).copied() else {
            return;
        };
        let Some((manager, _)) = self.identities.clone() else {
            return;
        };
        if at > std::time::Instant::now() {
            return;
        }
        match manager.obtain(arn).await {
            Ok(svid) => {
                tracing::info!(task = %id, identity = %svid.id, serial = %svid.serial, "certificate issued by the issuer");
                self.tasks.set_identity(index, svid.id.clone());
                self.identity_retry.remove(id);
                self.reported_no_identity.remove(id);
            }
            Err(e) => {
                let next = (backoff * 2).min(RETRY_MAX);
                self.identity_retry
                    .insert(id.clone(), (std::time::Instant::now() + backoff, next));
                tracing::debug!(task = %id, error = %e, "still no certificate from the issuer");
            }
        }
    }

    /// Issuer mode: [`Self::retry_identity`] for every enrolled task still waiting.
    pub(super) async fn retry_identities(&mut self) {
        let waiting: Vec<(TaskId, String, u32)> = self
            .enrolled
            .iter()
            .filter(|(id, _)| self.identity_retry.contains_key(*id))
            .map(|(id, e)| (id.clone(), e.arn.clone(), e.index))
            .collect();
        for (id, arn, index) in waiting {
            self.retry_identity(&id, &arn, index).await;
        }
    }
}
