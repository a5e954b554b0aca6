//! Keeps the node proxy's enrolment in step with what the ECS agent says runs here:
//! tasks that appear are enrolled (cgroups into the kernel map, a certificate issued),
//! tasks that stop are unenrolled (certificate dropped, open connections drained), and
//! the health gate decides whether a task's endpoints take new mesh connections.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
};

use tokio_util::sync::CancellationToken;

use crate::{
    config::{EcsSettings, NetworkMode},
    ebpf::Enroller,
    ecs::{self, CgroupLayout, DockerHealth, EcsAgent, EcsError, Gate, LocalNetworkMode},
    identity::{IdentityManager, SpiffeId},
    metrics::{Metrics, ResultLabels, StateLabels},
    proxy::ExpectedIdentity,
    tasks::{TaskRef, TaskTable},
    types::TaskId,
};

struct Enrolled {
    index: u32,
    arn: String,
    family: String,
    mode: NetworkMode,
    cgroups: Vec<PathBuf>,
    cgroup_ids: Vec<u64>,
}

mod identity;

/// Issuer mode: first and longest wait before asking the issuer again for a task.
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// File in `state_dir` with the ECS tasks enrolled, rewritten whenever they change.
pub const STATE_FILE: &str = "ecs-tasks.json";

/// One enrolled ECS task as the state file keeps it: enough to enrol it again, at the same
/// task index, before the next proxy attaches (the kernel's entries carry the index).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SavedTask {
    index: u32,
    id: String,
    /// The task ARN (issuer mode asks for certificates by ARN); empty in older files.
    #[serde(default)]
    arn: String,
    family: String,
    mode: NetworkMode,
    cgroups: Vec<PathBuf>,
    serving: bool,
}

/// What the reconciler needs to know about this node besides the ECS settings.
pub struct NodeSide {
    /// The programs' attach point (`cgroup_root`).
    pub attach_root: PathBuf,
    /// Where the enrolled tasks are kept for the next proxy (`STATE_FILE` in `state_dir`).
    pub state_file: PathBuf,
    /// Where tasks of unknown network mode reach the proxy.
    pub default_mode: NetworkMode,
}

pub struct Reconciler {
    agent: EcsAgent,
    docker: Option<DockerHealth>,
    cgroup_root: PathBuf,
    /// Where the programs are attached: a cgroup outside it is not redirected, so a task
    /// found there is reported as not meshed, never enrolled.
    attach_root: PathBuf,
    layout: Option<CgroupLayout>,
    /// Where tasks of unknown network mode reach the proxy (bridge when a bridge address
    /// is configured: ECS's default mode on Linux).
    default_mode: NetworkMode,
    tasks: Arc<TaskTable>,
    enroller: Arc<Enroller>,
    identities: Option<(Arc<IdentityManager>, Arc<ExpectedIdentity>)>,
    metrics: Arc<Metrics>,
    enrolled: HashMap<TaskId, Enrolled>,
    reported_awsvpc: HashSet<TaskId>,
    reported_outside: HashSet<TaskId>,
    reported_stopping: HashSet<TaskId>,
    /// Tasks the identity template cannot be rendered for, or the issuer refused
    /// (reported once each).
    reported_no_identity: HashSet<TaskId>,
    /// Issuer mode: enrolled tasks without an identity yet, and when to ask again.
    identity_retry: HashMap<TaskId, (std::time::Instant, std::time::Duration)>,
    state_file: PathBuf,
    /// What the state file holds now.
    saved: Vec<SavedTask>,
}

impl Reconciler {
    pub fn new(
        settings: &EcsSettings,
        node: NodeSide,
        tasks: Arc<TaskTable>,
        enroller: Arc<Enroller>,
        identities: Option<(Arc<IdentityManager>, Arc<ExpectedIdentity>)>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EcsError> {
        let layout = settings.layout;
        Ok(Self {
            agent: EcsAgent::new(settings.agent_url.clone())?,
            docker: settings.docker_socket.as_ref().map(DockerHealth::new),
            cgroup_root: settings.cgroup_root.clone(),
            attach_root: node.attach_root,
            layout,
            default_mode: node.default_mode,
            tasks,
            enroller,
            identities,
            metrics,
            enrolled: HashMap::new(),
            reported_awsvpc: HashSet::new(),
            reported_outside: HashSet::new(),
            reported_stopping: HashSet::new(),
            reported_no_identity: HashSet::new(),
            identity_retry: HashMap::new(),
            state_file: node.state_file,
            saved: Vec::new(),
        })
    }

    /// One poll of the agent; applies every change it finds.
    pub async fn sync(&mut self) -> Result<(), EcsError> {
        let layout = match self.layout {
            Some(l) => l,
            None => CgroupLayout::detect(&self.cgroup_root)?,
        };
        let snapshot =
            ecs::snapshot(&self.agent, self.docker.as_ref(), &self.cgroup_root, layout).await;
        let snapshot = match snapshot {
            Ok(s) => {
                self.metrics
                    .ecs_syncs
                    .get_or_create(&ResultLabels { result: "ok" })
                    .inc();
                s
            }
            Err(e) => {
                self.metrics
                    .ecs_syncs
                    .get_or_create(&ResultLabels { result: "error" })
                    .inc();
                // Enrolled tasks (restored ones after a restart) still get their
                // certificates while the agent is down: the issuer checks with ECS.
                self.retry_identities().await;
                return Err(e);
            }
        };
        let mut present = HashSet::new();
        let (mut pending, mut awsvpc, mut outside) = (0, 0, 0);
        for task in snapshot {
            let mode = match task.network_mode {
                LocalNetworkMode::Host => NetworkMode::Host,
                LocalNetworkMode::Bridge => NetworkMode::Bridge,
                LocalNetworkMode::Unknown => self.default_mode,
                LocalNetworkMode::Awsvpc => {
                    awsvpc += 1;
                    if self.reported_awsvpc.insert(task.task_id.clone()) {
                        tracing::warn!(task = %task.task_id, family = %task.family, "awsvpc task: not meshed yet (its netns is not the host's)");
                    }
                    continue;
                }
            };
            if task.gate == Gate::Drain("stopped") {
                // Known STOPPED: its processes are gone; leave it out, so it is unenrolled.
                continue;
            }
            let cgroups: Vec<PathBuf> = task
                .containers
                .iter()
                .filter_map(|c| c.cgroup.clone())
                .collect();
            if cgroups.is_empty() {
                pending += 1;
                continue;
            }
            if let Some(cg) = cgroups.iter().find(|c| !c.starts_with(&self.attach_root)) {
                // Enrolling it would report a task as meshed that nothing redirects.
                outside += 1;
                if self.reported_outside.insert(task.task_id.clone()) {
                    tracing::warn!(task = %task.task_id, family = %task.family, cgroup = %cg.display(), cgroup_root = %self.attach_root.display(), "task's cgroup is outside cgroup_root: not meshed");
                }
                continue;
            }
            present.insert(task.task_id.clone());
            // Desired STOPPED while still running: it stays meshed while ECS lets it drain
            // (its open connections finish, its own connections stay meshed, its
            // certificate renews), but takes no new inbound connections.
            if task.gate == Gate::Drain("stopping")
                && self.reported_stopping.insert(task.task_id.clone())
            {
                tracing::info!(task = %task.task_id, "task stopping: meshed while it drains, no new inbound connections");
            }
            let serving = task.gate == Gate::Serve;
            if let Some(known) = self.enrolled.get_mut(&task.task_id) {
                if let Some(t) = self.tasks.get(known.index) {
                    if t.serving() != serving {
                        tracing::info!(task = %task.task_id, gate = ?task.gate, "health gate changed");
                    }
                    t.set_serving(serving);
                }
                let new: Vec<PathBuf> = cgroups
                    .iter()
                    .filter(|c| !known.cgroups.contains(c))
                    .cloned()
                    .collect();
                let index = known.index;
                if !new.is_empty() {
                    match self.enroller.enrol(known.index, mode, &new) {
                        Ok(ids) => {
                            known.cgroup_ids.extend(ids);
                            known.cgroups.extend(new);
                        }
                        Err(e) => {
                            tracing::warn!(task = %task.task_id, error = %e, "enrolling new containers failed")
                        }
                    }
                }
                self.retry_identity(&task.task_id, &task.arn, index).await;
                continue;
            }
            let identity = self
                .identity_for(&task.task_id, &task.arn, &task.family)
                .await;
            let (id, arn, family) = (&task.task_id, &task.arn, &task.family);
            self.enrol_at(id, arn, family, mode, cgroups, serving, None, identity);
        }
        let gone: Vec<TaskId> = self
            .enrolled
            .keys()
            .filter(|id| !present.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.unenrol(&id);
        }
        self.reported_awsvpc.retain(|_| awsvpc > 0);
        self.reported_outside.retain(|_| outside > 0);
        self.reported_stopping.retain(|id| present.contains(id));
        self.reported_no_identity.retain(|id| present.contains(id));
        self.identity_retry.retain(|id, _| present.contains(id));
        let serving = self.tasks.all().iter().filter(|(_, t)| t.serving()).count();
        let set = |state, n: usize| {
            self.metrics
                .ecs_tasks
                .get_or_create(&StateLabels { state })
                .set(n as i64)
        };
        set("enrolled", self.enrolled.len());
        set("serving", serving);
        set("pending", pending);
        set("not_meshed_awsvpc", awsvpc);
        set("not_meshed_outside_cgroup_root", outside);
        if self.identities.is_some() {
            let without = self
                .tasks
                .all()
                .iter()
                .filter(|(_, t)| t.identity.is_none())
                .count();
            set("no_identity", without);
        }
        self.save();
        Ok(())
    }

    /// Enrols the tasks of the state file whose containers still exist, at their old task
    /// indexes, so a restarted proxy meshes them before it attaches and before the agent
    /// answers (it may be down). The next successful poll corrects the set.
    pub fn restore(&mut self) -> usize {
        let text = match std::fs::read_to_string(&self.state_file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                tracing::warn!(path = %self.state_file.display(), error = %e, "cannot read the state file; starting without it");
                return 0;
            }
        };
        let saved: Vec<SavedTask> = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %self.state_file.display(), error = %e, "malformed state file; starting without it");
                return 0;
            }
        };
        let mut restored = 0;
        for t in saved {
            let Ok(id) = TaskId::new(&t.id) else { continue };
            if !t.cgroups.iter().all(|c| c.is_dir()) {
                continue; // gone while no proxy ran
            }
            // File mode renders the identity now; issuer mode asks at the first poll.
            let identity = match self.identities.as_ref().map(|(m, e)| (m.remote(), e)) {
                Some((None, expected)) => self.render(&id, &t.family, expected.clone()),
                Some((Some(_), _)) => {
                    self.identity_retry
                        .insert(id.clone(), (std::time::Instant::now(), RETRY_FIRST));
                    None
                }
                None => None,
            };
            let (index, serving) = (Some(t.index), t.serving);
            if self.enrol_at(
                &id, &t.arn, &t.family, t.mode, t.cgroups, serving, index, identity,
            ) {
                restored += 1;
            }
        }
        self.save();
        restored
    }

    /// Rewrites the state file when the enrolled set changed (write, then rename).
    fn save(&mut self) {
        let mut now: Vec<SavedTask> = self
            .enrolled
            .iter()
            .map(|(id, e)| SavedTask {
                index: e.index,
                id: id.as_str().to_owned(),
                arn: e.arn.clone(),
                family: e.family.clone(),
                mode: e.mode,
                cgroups: e.cgroups.clone(),
                serving: self.tasks.get(e.index).is_some_and(|t| t.serving()),
            })
            .collect();
        now.sort_by_key(|t| t.index);
        if now == self.saved {
            return;
        }
        let result = (|| {
            if let Some(dir) = self.state_file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.state_file.with_extension("json.tmp");
            std::fs::write(
                &tmp,
                serde_json::to_vec(&now).map_err(std::io::Error::other)?,
            )?;
            std::fs::rename(&tmp, &self.state_file)
        })();
        match result {
            Ok(()) => self.saved = now,
            Err(e) => {
                tracing::warn!(path = %self.state_file.display(), error = %e, "cannot write the state file; a restart would wait for the agent")
            }
        }
    }

    /// Enrols a task (file mode: certificate first), at `index` when given and free;
    /// returns whether it is enrolled.
    #[allow(clippy::too_many_arguments)]
    fn enrol_at(
        &mut self,
        id: &TaskId,
        arn: &str,
        family: &str,
        mode: NetworkMode,
        cgroups: Vec<PathBuf>,
        serving: bool,
        index: Option<u32>,
        identity: Option<SpiffeId>,
    ) -> bool {
        if let (Some((manager, _)), Some(identity)) = (&self.identities, &identity)
            && manager.remote().is_none()
        {
            match manager.ensure(identity) {
                Ok(svid) => {
                    tracing::info!(task = %id, identity = %identity, serial = %svid.serial, "certificate issued")
                }
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "certificate not issued; task not enrolled yet");
                    return false;
                }
            }
        }
        let task = TaskRef::new(id.clone(), family.to_owned(), identity, serving);
        let index = match index {
            Some(i) => match self.tasks.insert_at(i, task) {
                Ok(()) => i,
                Err(task) => {
                    tracing::warn!(task = %id, "its old task index is taken; enrolled under a new one");
                    self.tasks.insert(task)
                }
            },
            None => self.tasks.insert(task),
        };
        match self.enroller.enrol(index, mode, &cgroups) {
            Ok(cgroup_ids) => {
                tracing::info!(task = %id, family, ?mode, containers = cgroups.len(), serving, "task enrolled");
                self.enrolled.insert(
                    id.clone(),
                    Enrolled {
                        index,
                        arn: arn.to_owned(),
                        family: family.to_owned(),
                        mode,
                        cgroups,
                        cgroup_ids,
                    },
                );
                true
            }
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "enrolling failed; will retry");
                self.tasks.remove(index);
                false
            }
        }
    }

    fn unenrol(&mut self, id: &TaskId) {
        let Some(known) = self.enrolled.remove(id) else {
            return;
        };
        self.enroller.unenrol(&known.cgroup_ids);
        let Some(task) = self.tasks.remove(known.index) else {
            return;
        };
        // The certificate goes with the last task of that identity on this instance.
        if let (Some((manager, _)), Some(identity)) = (&self.identities, &task.identity)
            && manager.remote().is_some()
        {
            manager.release(identity, &known.arn);
        } else if let (Some((manager, _)), Some(identity)) = (&self.identities, &task.identity)
            && !self
                .tasks
                .all()
                .iter()
                .any(|(_, t)| t.identity.as_ref() == Some(identity))
        {
            manager.remove(identity);
        }
        tracing::info!(task = %id, family = %task.family, "task unenrolled; its connections are drained");
    }

    /// Poll until shutdown; errors keep the current enrolment (last good state).
    pub async fn run(mut self, every: std::time::Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if let Err(e) = self.sync().await {
                tracing::warn!(error = %e, "ECS agent poll failed; keeping the current enrolment");
            }
        }
    }
}
