//! The issuer's state file (JSON): the node certificate last issued to each instance —
//! what makes a second attestation with the same document a replay — and the deny list
//! `ecsmesh issuer deny-instance` edits.
//!
//! Written atomically (temporary file + rename) and re-read whenever its modification
//! time, size or inode changes, so replicas sharing it and the CLI editing it see each
//! other's changes. A file that does not exist is an empty state; one that does not parse
//! fails every request that needs it (closed), not silently as "empty".
use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, PUBLIC_MODE, write_atomic};

/// Records whose node certificate expired this long ago are dropped on the next write.
const PRUNE_AFTER: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an issuer state file: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Write(#[from] IdentityError),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateData {
    /// By EC2 instance id.
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceRecord>,
    /// EC2 instance ids that get nothing new.
    #[serde(default)]
    pub denied: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    pub container_instance_arn: String,
    /// Lowercase hex.
    pub node_cert_serial: String,
    /// Unix seconds.
    pub node_cert_not_after: u64,
    /// Unix seconds of the attestation the current chain of node certificates began with.
    pub attested_at: u64,
}

impl StateData {
    /// Whether `instance` holds an unexpired node certificate at `now`.
    pub fn holds_node_cert(&self, instance: &str, now: SystemTime) -> bool {
        self.instances
            .get(instance)
            .is_some_and(|r| r.node_cert_not_after > unix_secs(now))
    }

    fn prune(&mut self, now: SystemTime) {
        let horizon = unix_secs(now).saturating_sub(PRUNE_AFTER.as_secs());
        self.instances
            .retain(|_, r| r.node_cert_not_after >= horizon);
    }
}

/// What identifies one version of the file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime: (i64, i64),
    len: u64,
    ino: u64,
}

#[derive(Debug)]
struct Cached {
    stamp: Option<Stamp>,
    data: StateData,
}

/// The state file, cached in memory and re-read when it changed.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    cache: Mutex<Option<Cached>>,
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            cache: Mutex::new(None),
        }
    }

    /// The current state.
    pub fn read(&self) -> Result<StateData, StateError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.fresh(&mut cache)?.data.clone())
    }

    /// Runs `f` on the current state and writes the result if `f` succeeds and changed
    /// it. One writer at a time in this process; `f` should be quick (it runs locked).
    pub fn update<T, E: From<StateError>>(
        &self,
        f: impl FnOnce(&mut StateData) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.fresh(&mut cache)?;
        let mut data = current.data.clone();
        let out = f(&mut data)?;
        data.prune(SystemTime::now());
        if data != current.data {
            let text = serde_json::to_string_pretty(&data).map_err(|e| StateError::Parse {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
            write_atomic(&self.path, text.as_bytes(), PUBLIC_MODE).map_err(StateError::from)?;
            *cache = Some(Cached {
                stamp: stamp(&self.path)?,
                data,
            });
        }
        Ok(out)
    }

    fn fresh<'a>(&self, cache: &'a mut Option<Cached>) -> Result<&'a Cached, StateError> {
        let now = stamp(&self.path)?;
        if let Some(c) = cache.as_ref()
            && c.stamp == now
        {
            return Ok(cache.as_ref().expect("checked above"));
        }
        let data = match now {
            None => StateData::default(),
            Some(_) => {
                let text =
                    std::fs::read_to_string(&self.path).map_err(|source| StateError::Read {
                        path: self.path.clone(),
                        source,
                    })?;
                serde_json::from_str(&text).map_err(|e| StateError::Parse {
                    path: self.path.clone(),
                    message: e.to_string(),
                })?
            }
        };
        Ok(cache.insert(Cached { stamp: now, data }))
    }
}

fn stamp(path: &Path) -> Result<Option<Stamp>, StateError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(Stamp {
            mtime: (m.mtime(), m.mtime_nsec()),
            len: m.len(),
            ino: m.ino(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `ecsmesh issuer deny-instance` / `allow-instance`: whether the list changed.
pub fn set_denied(path: &Path, instance: &str, denied: bool) -> Result<bool, StateError> {
    StateFile::new(path.to_owned()).update(|s| {
        Ok::<_, StateError>(if denied {
            s.denied.insert(instance.to_owned())
        } else {
            s.denied.remove(instance)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_by_another_writer_are_seen_and_expired_records_pruned() {
        let dir = std::env::temp_dir().join(format!("ecsmesh-issuer-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let _ = std::fs::remove_file(&path);
        let file = StateFile::new(path.clone());
        assert_eq!(file.read().unwrap(), StateData::default());
        let now = SystemTime::now();
        file.update(|s| {
            for (id, not_after) in [("i-00000001", unix_secs(now) + 60), ("i-00000002", 5)] {
                s.instances.insert(
                    id.into(),
                    InstanceRecord {
                        container_instance_arn: "arn".into(),
                        node_cert_serial: "01".into(),
                        node_cert_not_after: not_after,
                        attested_at: 1,
                    },
                );
            }
            Ok::<_, StateError>(())
        })
        .unwrap();
        let s = file.read().unwrap();
        assert!(s.holds_node_cert("i-00000001", now));
        assert!(!s.instances.contains_key("i-00000002"), "pruned");
        assert!(set_denied(&path, "i-00000003", true).unwrap());
        assert!(!set_denied(&path, "i-00000003", true).unwrap());
        assert!(file.read().unwrap().denied.contains("i-00000003"));
        assert!(set_denied(&path, "i-00000003", false).unwrap());
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(file.read(), Err(StateError::Parse { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
