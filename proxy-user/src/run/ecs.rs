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
    identity::IdentityManager,
    metrics::{Metrics, ResultLabels, StateLabels},
    proxy::ExpectedIdentity,
    tasks::{TaskRef, TaskTable},
    types::TaskId,
};

struct Enrolled {
    index: u32,
    cgroups: Vec<PathBuf>,
    cgroup_ids: Vec<u64>,
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
}

impl Reconciler {
    pub fn new(
        settings: &EcsSettings,
        attach_root: PathBuf,
        default_mode: NetworkMode,
        tasks: Arc<TaskTable>,
        enroller: Arc<Enroller>,
        identities: Option<(Arc<IdentityManager>, Arc<ExpectedIdentity>)>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EcsError> {
        let uri = settings.agent_url.parse().map_err(|_| EcsError::BadUrl {
            url: settings.agent_url.clone(),
            reason: "not a URI",
        })?;
        let layout = match settings.layout.as_str() {
            "v1" => Some(CgroupLayout::V1),
            "v2" => Some(CgroupLayout::V2),
            _ => None,
        };
        Ok(Self {
            agent: EcsAgent::new(uri)?,
            docker: settings.docker_socket.as_ref().map(DockerHealth::new),
            cgroup_root: settings.cgroup_root.clone(),
            attach_root,
            layout,
            default_mode,
            tasks,
            enroller,
            identities,
            metrics,
            enrolled: HashMap::new(),
            reported_awsvpc: HashSet::new(),
            reported_outside: HashSet::new(),
            reported_stopping: HashSet::new(),
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
                continue;
            }
            self.enrol(&task.task_id, &task.family, mode, cgroups, serving);
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
        Ok(())
    }

    fn enrol(
        &mut self,
        id: &TaskId,
        family: &str,
        mode: NetworkMode,
        cgroups: Vec<PathBuf>,
        serving: bool,
    ) {
        let identity = self
            .identities
            .as_ref()
            .and_then(|(_, e)| e.for_family(family));
        if let (Some((manager, _)), Some(identity)) = (&self.identities, &identity) {
            match manager.ensure(identity) {
                Ok(svid) => {
                    tracing::info!(task = %id, identity = %identity, serial = %svid.serial, "certificate issued")
                }
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "certificate not issued; task not enrolled yet");
                    return;
                }
            }
        }
        let index = self.tasks.insert(TaskRef::new(
            id.clone(),
            family.to_owned(),
            identity,
            serving,
        ));
        match self.enroller.enrol(index, mode, &cgroups) {
            Ok(cgroup_ids) => {
                tracing::info!(task = %id, family, ?mode, containers = cgroups.len(), serving, "task enrolled");
                self.enrolled.insert(
                    id.clone(),
                    Enrolled {
                        index,
                        cgroups,
                        cgroup_ids,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "enrolling failed; will retry");
                self.tasks.remove(index);
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
