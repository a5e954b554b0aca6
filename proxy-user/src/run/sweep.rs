//! The series sweep: every few seconds, the task names live on this node (its enrolled
//! tasks, and discovery's endpoints when the mesh is on) go to the [`Janitor`], and the
//! series naming a task gone for the grace period are removed.
use std::{collections::HashSet, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    discovery::Sources, metrics::Metrics, metrics::series::Janitor, proxy::Mesh, tasks::TaskTable,
};

/// How often the sweep runs: a fraction of the grace period, between 100 ms and 10 s.
fn period(grace: Duration) -> Duration {
    (grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(10))
}

/// Every name a series may carry for a live task: local tasks' families and identities;
/// discovery's endpoint families, addresses and the identities callers expect of them.
fn live_names(tasks: &TaskTable, mesh: Option<&Mesh>) -> HashSet<String> {
    let mut live = HashSet::new();
    for (_, task) in tasks.all() {
        live.insert(task.family.clone());
        if let Some(id) = &task.identity {
            live.insert(id.to_string());
        }
    }
    if let Some(mesh) = mesh {
        let discovery = mesh.discovery.load();
        for (_, endpoints) in discovery.services() {
            for ep in endpoints {
                live.insert(ep.family.clone());
                live.insert(ep.addr.to_string());
                if let Some(id) = mesh.expected.for_endpoint(ep) {
                    live.insert(id.to_string());
                }
            }
        }
    }
    live
}

pub(super) async fn run(
    metrics: Arc<Metrics>,
    tasks: Arc<TaskTable>,
    mesh: Option<(Arc<Mesh>, Arc<Sources>)>,
    grace: Duration,
    shutdown: CancellationToken,
) {
    let mut janitor = Janitor::new(grace);
    let mut tick = tokio::time::interval(period(grace));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let mut departed: Vec<String> = Vec::new();
        for t in tasks.take_departed() {
            departed.push(t.family.clone());
            departed.extend(t.identity.as_ref().map(ToString::to_string));
        }
        if let Some((mesh, sources)) = &mesh {
            for ep in sources.take_departed() {
                departed.extend(mesh.expected.for_endpoint(&ep).map(|id| id.to_string()));
                departed.push(ep.addr.to_string());
                departed.push(ep.family);
            }
        }
        let live = live_names(&tasks, mesh.as_ref().map(|(m, _)| &**m));
        let gone = janitor.sweep(std::time::Instant::now(), live, departed);
        let removed = metrics.remove_series(&|name| gone.contains(name));
        if removed > 0 {
            tracing::debug!(removed, "series of stopped tasks removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{tasks::TaskRef, types::TaskId};

    #[test]
    fn live_names_are_the_local_tasks_families_and_identities() {
        let tasks = TaskTable::default();
        let id = "spiffe://td/ecs/c/web".parse().unwrap();
        let i = tasks.insert(TaskRef::new(
            TaskId::new("a1").unwrap(),
            "web".into(),
            Some(id),
            true,
        ));
        let live = live_names(&tasks, None);
        assert!(live.contains("web") && live.contains("spiffe://td/ecs/c/web"));
        tasks.remove(i);
        assert!(live_names(&tasks, None).is_empty());
        let departed: Vec<_> = tasks
            .take_departed()
            .iter()
            .map(|t| t.family.clone())
            .collect();
        assert_eq!(departed, ["web"]);
        assert!(tasks.take_departed().is_empty());
        assert_eq!(period(Duration::from_secs(300)), Duration::from_secs(10));
        assert_eq!(period(Duration::from_secs(2)), Duration::from_millis(500));
    }
}
