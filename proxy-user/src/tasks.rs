//! The proxy's table of enrolled tasks. The kernel labels each redirected connection with a
//! `task_index`; this table turns it back into a task, its identity and its state. Slots
//! are reused after a task leaves, so indexes stay small and the table bounded.
use std::sync::{
    Arc, RwLock,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use tokio_util::sync::CancellationToken;

use crate::{identity::SpiffeId, types::TaskId};

#[derive(Debug)]
pub struct TaskRef {
    pub id: TaskId,
    pub family: String,
    pub identity: Option<SpiffeId>,
    /// Cancelled when the task stops: its open connections are closed.
    pub drain: CancellationToken,
    /// Health gate: whether the task takes new mesh connections.
    serving: AtomicBool,
    /// Outbound connections of this task open in the proxy (see `try_open`).
    open: AtomicUsize,
}

/// One open outbound connection of a task; released on drop.
#[derive(Debug)]
pub struct OpenSlot(Arc<TaskRef>);

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TaskRef {
    pub fn new(id: TaskId, family: String, identity: Option<SpiffeId>, serving: bool) -> Self {
        Self {
            id,
            family,
            identity,
            drain: CancellationToken::new(),
            serving: AtomicBool::new(serving),
            open: AtomicUsize::new(0),
        }
    }

    /// Count one more open connection unless the task already has `cap`.
    pub fn try_open(self: &Arc<Self>, cap: usize) -> Option<OpenSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| OpenSlot(self.clone()))
    }

    /// Outbound connections of this task open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }
}

#[derive(Debug, Default)]
pub struct TaskTable {
    slots: RwLock<Vec<Option<Arc<TaskRef>>>>,
    /// Tasks removed since the last `take_departed` (newest kept when it overflows): the
    /// metrics sweep learns of tasks that came and went between two sweeps.
    departed: std::sync::Mutex<std::collections::VecDeque<Arc<TaskRef>>>,
}

/// The most departures kept between two metrics sweeps.
const DEPARTED_KEPT: usize = 4096;

impl TaskTable {
    /// Add a task; returns its index (the kernel's `task_index`).
    pub fn insert(&self, task: TaskRef) -> u32 {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let task = Some(Arc::new(task));
        match slots.iter().position(Option::is_none) {
            Some(i) => {
                slots[i] = task;
                i as u32
            }
            None => {
                slots.push(task);
                (slots.len() - 1) as u32
            }
        }
    }

    /// Add a task at a given index (restoring the enrolment of a previous run, whose
    /// kernel entries carry that index); hands the task back if the slot is taken.
    pub fn insert_at(&self, index: u32, task: TaskRef) -> Result<(), TaskRef> {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let i = index as usize;
        if slots.len() <= i {
            slots.resize(i + 1, None);
        }
        if slots[i].is_some() {
            return Err(task);
        }
        slots[i] = Some(Arc::new(task));
        Ok(())
    }

    /// Gives the task at `index` its identity (issuer mode: it arrived after enrolment).
    /// The slot gets a new `TaskRef` sharing the old one's drain token and gate, so
    /// connections opened before still drain with the task.
    pub fn set_identity(&self, index: u32, identity: SpiffeId) -> bool {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let Some(Some(old)) = slots.get(index as usize) else {
            return false;
        };
        let new = TaskRef {
            id: old.id.clone(),
            family: old.family.clone(),
            identity: Some(identity),
            drain: old.drain.clone(),
            serving: AtomicBool::new(old.serving()),
            open: AtomicUsize::new(0),
        };
        slots[index as usize] = Some(Arc::new(new));
        true
    }

    pub fn get(&self, index: u32) -> Option<Arc<TaskRef>> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots.get(index as usize).cloned().flatten()
    }

    /// Remove a task and close its open connections.
    pub fn remove(&self, index: u32) -> Option<Arc<TaskRef>> {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let task = slots.get_mut(index as usize)?.take()?;
        task.drain.cancel();
        let mut departed = self.departed.lock().unwrap_or_else(|p| p.into_inner());
        if departed.len() == DEPARTED_KEPT {
            departed.pop_front();
        }
        departed.push_back(task.clone());
        Some(task)
    }

    /// The tasks removed since the last call.
    pub fn take_departed(&self) -> Vec<Arc<TaskRef>> {
        let mut departed = self.departed.lock().unwrap_or_else(|p| p.into_inner());
        departed.drain(..).collect()
    }

    pub fn all(&self) -> Vec<(u32, Arc<TaskRef>)> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .enumerate()
            .filter_map(|(i, t)| Some((i as u32, t.clone()?)))
            .collect()
    }

    pub fn find(&self, id: &TaskId) -> Option<(u32, Arc<TaskRef>)> {
        self.all().into_iter().find(|(_, t)| &t.id == id)
    }

    /// The family whose identity hashes to this SNI, if a task of it is enrolled here.
    pub fn family_for_sni(&self, sni: &str) -> Option<(SpiffeId, String)> {
        self.all().into_iter().find_map(|(_, t)| {
            let id = t.identity.as_ref()?;
            (id.sni() == sni).then(|| (id.clone(), t.family.clone()))
        })
    }

    /// Whether some enrolled task of `family` (or exactly `task`, when known) takes new
    /// connections.
    pub fn serving(&self, family: &str, task: Option<&TaskId>) -> bool {
        self.all()
            .iter()
            .any(|(_, t)| t.family == family && task.is_none_or(|id| &t.id == id) && t.serving())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn per_task_cap_counts_open_slots_and_releases_them() {
        let a = Arc::new(TaskRef::new(
            TaskId::new("a").unwrap(),
            "f".into(),
            None,
            true,
        ));
        let b = Arc::new(TaskRef::new(
            TaskId::new("b").unwrap(),
            "f".into(),
            None,
            true,
        ));
        let mut held: Vec<_> = (0..3)
            .map(|_| a.try_open(3).expect("under the cap"))
            .collect();
        assert!(a.try_open(3).is_none(), "the 4th is refused");
        assert_eq!(a.open_connections(), 3, "a refusal takes no slot");
        assert!(b.try_open(3).is_some(), "another task is not affected");
        drop(held.pop());
        assert_eq!(a.open_connections(), 2);
        let again = a.try_open(3).expect("a slot was released");
        assert!(a.try_open(3).is_none());
        drop(again);
        assert_eq!(a.open_connections(), 2);
    }

    use super::*;

    fn task(id: &str, family: &str) -> TaskRef {
        TaskRef::new(TaskId::new(id).unwrap(), family.into(), None, true)
    }

    #[test]
    fn slots_are_reused_and_removal_drains() {
        let t = TaskTable::default();
        assert_eq!(t.insert(task("a", "web")), 0);
        assert_eq!(t.insert(task("b", "web")), 1);
        let a = t.remove(0).unwrap();
        assert!(a.drain.is_cancelled());
        assert!(t.get(0).is_none());
        assert_eq!(t.insert(task("c", "api")), 0);
        assert_eq!(t.get(1).unwrap().id.as_str(), "b");
    }

    #[test]
    fn insert_at_restores_an_index_or_refuses_a_taken_one() {
        let t = TaskTable::default();
        t.insert_at(3, task("a", "web")).unwrap();
        assert_eq!(t.get(3).unwrap().id.as_str(), "a");
        assert!(t.insert_at(3, task("b", "web")).is_err());
        // The gap below is reused first.
        assert_eq!(t.insert(task("c", "web")), 0);
    }

    #[test]
    fn serving_follows_the_gate_of_the_named_task() {
        let t = TaskTable::default();
        t.insert(task("a", "web"));
        t.insert(task("b", "web"));
        t.get(0).unwrap().set_serving(false);
        assert!(
            t.serving("web", None),
            "a healthy sibling serves the family"
        );
        assert!(!t.serving("web", Some(&TaskId::new("a").unwrap())));
        assert!(t.serving("web", Some(&TaskId::new("b").unwrap())));
        assert!(!t.serving("api", None));
    }
}
