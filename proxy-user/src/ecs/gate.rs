//! Whether a local task may take traffic. ECS itself only routes to a task (load
//! balancer, Service Connect, Cloud Map health) once it is RUNNING and its essential
//! containers pass their health checks; the mesh must be no looser, or it would send
//! connections to a task ECS still considers starting or is about to kill.
use std::collections::HashMap;

use super::{AgentTask, Health};

/// The verdict for one task. The reasons are short fixed words for logs and metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Gate {
    /// Running, and every essential container healthy or without a health check.
    Serve,
    /// Not (yet or any more) eligible for new connections, but not on its way out:
    /// `"pending"`, `"starting"`, `"unhealthy"`, `"health unknown"`.
    NotYet(&'static str),
    /// On its way out: take no new connections, let open ones finish.
    /// `"stopping"` (desired STOPPED, still running) or `"stopped"` (known STOPPED; such
    /// tasks are gone, and [`super::snapshot`] leaves them out altogether).
    Drain(&'static str),
}

/// Every container counts as essential. `/v1/tasks` does not carry the task
/// definition's `essential` flag; the exact flags need the ECS `DescribeTaskDefinition`
/// (or `DescribeTasks`) API with credentials. Erring this way only ever holds a task
/// back because of a non-essential container's health, never serves a broken one.
pub fn all_essential(_container_name: &str) -> bool {
    true
}

/// Decide for one task. `health` is keyed by Docker id; a container missing from it is
/// treated as having no health check (the caller fills [`Health::Unknown`] explicitly
/// when it asked Docker and got no answer).
pub fn gate(
    task: &AgentTask,
    health: &HashMap<String, Health>,
    essential: impl Fn(&str) -> bool,
) -> Gate {
    if task.known_status == "STOPPED" {
        return Gate::Drain("stopped");
    }
    if task.desired_status == "STOPPED" {
        return Gate::Drain("stopping");
    }
    if task.known_status != "RUNNING" || task.desired_status != "RUNNING" {
        return Gate::NotYet("pending");
    }
    let mut worst: Option<&'static str> = None;
    let rank = |r: &str| match r {
        "unhealthy" => 3,
        "health unknown" => 2,
        _ => 1,
    };
    for c in task.containers.iter().filter(|c| essential(&c.name)) {
        let reason = match health.get(&c.docker_id).copied().unwrap_or(Health::None) {
            Health::None | Health::Healthy => continue,
            Health::Starting => "starting",
            Health::Unhealthy => "unhealthy",
            Health::Unknown => "health unknown",
        };
        if worst.is_none_or(|w| rank(reason) > rank(w)) {
            worst = Some(reason);
        }
    }
    match worst {
        Some(reason) => Gate::NotYet(reason),
        None => Gate::Serve,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ecs::AgentContainer;

    fn task(known: &str, desired: &str) -> AgentTask {
        let c = |name: &str, id: &str| AgentContainer {
            docker_id: id.into(),
            docker_name: format!("ecs-orders-7-{name}"),
            name: name.into(),
            image: String::new(),
            ports: vec![],
            networks: vec![],
        };
        AgentTask {
            arn: "arn:aws:ecs:us-east-1:123456789012:task/prod/4d2c0a8f0b6e4b8c9a1e2f3a4b5c6d7e"
                .into(),
            desired_status: desired.into(),
            known_status: known.into(),
            family: "orders".into(),
            version: "7".into(),
            containers: vec![c("web", "aaa"), c("log-router", "bbb")],
        }
    }

    fn health(web: Health, log: Health) -> HashMap<String, Health> {
        HashMap::from([("aaa".into(), web), ("bbb".into(), log)])
    }

    #[test]
    fn running_and_healthy_or_unchecked_serves() {
        let t = task("RUNNING", "RUNNING");
        assert_eq!(
            gate(&t, &health(Health::Healthy, Health::None), all_essential),
            Gate::Serve
        );
        assert_eq!(
            gate(&t, &health(Health::None, Health::None), all_essential),
            Gate::Serve
        );
        // No Docker answer at all: nothing known about health checks.
        assert_eq!(gate(&t, &HashMap::new(), all_essential), Gate::Serve);
    }

    #[test]
    fn health_holds_new_connections_back() {
        let t = task("RUNNING", "RUNNING");
        let g = |w, l| gate(&t, &health(w, l), all_essential);
        assert_eq!(g(Health::Starting, Health::None), Gate::NotYet("starting"));
        assert_eq!(
            g(Health::Unhealthy, Health::None),
            Gate::NotYet("unhealthy")
        );
        assert_eq!(
            g(Health::Starting, Health::Unhealthy),
            Gate::NotYet("unhealthy")
        );
        assert_eq!(
            g(Health::Unknown, Health::Starting),
            Gate::NotYet("health unknown")
        );
    }

    #[test]
    fn non_essential_containers_do_not_gate() {
        let t = task("RUNNING", "RUNNING");
        let h = health(Health::Healthy, Health::Unhealthy);
        assert_eq!(gate(&t, &h, |name| name != "log-router"), Gate::Serve);
        assert_eq!(gate(&t, &h, all_essential), Gate::NotYet("unhealthy"));
    }

    #[test]
    fn lifecycle_states() {
        let h = health(Health::Healthy, Health::Healthy);
        assert_eq!(
            gate(&task("PENDING", "RUNNING"), &h, all_essential),
            Gate::NotYet("pending")
        );
        // The agent omits DesiredStatus while its own desired status is PENDING.
        assert_eq!(
            gate(&task("RUNNING", ""), &h, all_essential),
            Gate::NotYet("pending")
        );
        assert_eq!(
            gate(&task("RUNNING", "STOPPED"), &h, all_essential),
            Gate::Drain("stopping")
        );
        assert_eq!(
            gate(&task("PENDING", "STOPPED"), &h, all_essential),
            Gate::Drain("stopping")
        );
        assert_eq!(
            gate(&task("STOPPED", "STOPPED"), &h, all_essential),
            Gate::Drain("stopped")
        );
        assert_eq!(
            gate(&task("STOPPED", ""), &h, all_essential),
            Gate::Drain("stopped")
        );
    }
}
