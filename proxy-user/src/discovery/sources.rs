//! The endpoints the data path sees: the discovery file and Cloud Map, merged. Each source
//! replaces only its own part; the file is read again when it changes, on SIGHUP and on
//! the operator's `POST /reload`. A new set that does not parse or merge is refused and the
//! previous one stays, so a bad edit never empties the mesh. Requests already in flight
//! keep the endpoint they picked; the next ones see the new set (a traffic shift never
//! fails a request or drops a connection).
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::{Discovery, Endpoint};

pub struct Sources {
    parts: Mutex<Parts>,
    view: Arc<ArcSwap<Discovery>>,
    file: Option<PathBuf>,
    inbound_port: u16,
    /// Endpoints that left since the last `take_departed` (newest kept when it
    /// overflows): the metrics sweep learns of endpoints that came and went between two
    /// sweeps.
    departed: Mutex<std::collections::VecDeque<Endpoint>>,
}

/// The most departed endpoints kept between two metrics sweeps.
const DEPARTED_KEPT: usize = 4096;

#[derive(Default)]
struct Parts {
    file: Vec<Endpoint>,
    cloudmap: Vec<Endpoint>,
}

impl Sources {
    /// `initial` is the discovery file as the config loaded it (empty without one).
    pub fn new(initial: &Discovery, file: Option<PathBuf>, inbound_port: u16) -> Arc<Self> {
        Arc::new(Self {
            parts: Mutex::new(Parts {
                file: initial.endpoints().cloned().collect(),
                cloudmap: Vec::new(),
            }),
            view: Arc::new(ArcSwap::from_pointee(initial.clone())),
            file,
            inbound_port,
            departed: Mutex::default(),
        })
    }

    /// The endpoints that left discovery since the last call.
    pub fn take_departed(&self) -> Vec<Endpoint> {
        let mut departed = self.departed.lock().unwrap_or_else(|e| e.into_inner());
        departed.drain(..).collect()
    }

    /// The merged endpoints, swapped as a whole on every change.
    pub fn view(&self) -> Arc<ArcSwap<Discovery>> {
        self.view.clone()
    }

    fn publish(&self, parts: &Parts) -> Result<usize, String> {
        let all: Vec<Endpoint> = parts.file.iter().chain(&parts.cloudmap).cloned().collect();
        let merged = Discovery::from_endpoints(all)
            .map_err(|(addr, a, b)| format!("{addr} is listed for both {a} and {b}"))?;
        let n = merged.len();
        let old = self.view.swap(Arc::new(merged));
        let now = self.view.load();
        let mut departed = self.departed.lock().unwrap_or_else(|e| e.into_inner());
        for ep in old.endpoints() {
            let kept = now
                .endpoints()
                .any(|e| e.addr == ep.addr && e.family == ep.family && e.service == ep.service);
            if !kept {
                if departed.len() == DEPARTED_KEPT {
                    departed.pop_front();
                }
                departed.push_back(ep.clone());
            }
        }
        Ok(n)
    }

    /// Cloud Map's current endpoints replace its previous ones.
    pub fn set_cloudmap(&self, endpoints: Vec<Endpoint>) -> Result<usize, String> {
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let previous = std::mem::replace(&mut parts.cloudmap, endpoints);
        self.publish(&parts)
            .inspect_err(|_| parts.cloudmap = previous)
    }

    /// Reads the discovery file again (no file configured: nothing to do).
    pub fn reload_file(&self) -> Result<usize, String> {
        let Some(path) = &self.file else {
            return Ok(self.view.load().len());
        };
        let file = Discovery::load(path, self.inbound_port).map_err(|e| e.to_string())?;
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let previous = std::mem::replace(&mut parts.file, file.endpoints().cloned().collect());
        self.publish(&parts).inspect_err(|_| parts.file = previous)
    }

    pub fn reload_logged(&self, trigger: &str) {
        match self.reload_file() {
            Ok(n) => tracing::info!(trigger, endpoints = n, "discovery file reloaded"),
            Err(e) => {
                tracing::warn!(trigger, error = %e, "discovery file not reloaded; keeping the previous endpoints")
            }
        }
    }

    /// Re-reads the file when it changes and on SIGHUP, until `shutdown`.
    pub fn spawn_watch(self: &Arc<Self>, shutdown: CancellationToken) {
        let Some(path) = &self.file else { return };
        let this = self.clone();
        crate::watch::reload_on_change_or_sighup(
            "discovery file",
            vec![crate::watch::absolute(path)],
            shutdown,
            move |trigger| this.reload_logged(trigger),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &std::path::Path, text: &str) -> PathBuf {
        let p = dir.join("discovery.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    const ORDERS: &str = "[[services]]\nname = \"orders\"\n[[services.endpoints]]\naddress = \"10.0.0.2:80\"\nfamily = \"orders\"\n";

    fn cloudmap_ep(addr: &str, family: &str) -> Endpoint {
        Endpoint {
            service: "billing".into(),
            addr: addr.parse().unwrap(),
            family: family.into(),
            weight: 1,
            subset: None,
            tunnel: "10.0.0.9:15008".parse().unwrap(),
            task: None,
            identity: None,
        }
    }

    #[test]
    fn each_source_replaces_its_part_and_a_bad_set_keeps_the_previous() {
        let dir = std::env::temp_dir().join(format!("ecsmesh-sources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = file(&dir, ORDERS);
        let initial = Discovery::load(&path, 15008).unwrap();
        let s = Sources::new(&initial, Some(path.clone()), 15008);
        assert_eq!(
            s.set_cloudmap(vec![cloudmap_ep("10.0.0.7:90", "billing")]),
            Ok(2)
        );
        // The file changes: its part is replaced, Cloud Map's stays.
        file(&dir, &ORDERS.replace("10.0.0.2:80", "10.0.0.3:80"));
        assert_eq!(s.reload_file(), Ok(2));
        let v = s.view().load_full();
        assert!(v.endpoint("10.0.0.3:80".parse().unwrap()).is_some());
        assert!(v.endpoint("10.0.0.2:80".parse().unwrap()).is_none());
        assert!(v.endpoint("10.0.0.7:90".parse().unwrap()).is_some());
        // The endpoint that left is handed to the metrics sweep, once.
        let departed: Vec<String> = s
            .take_departed()
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(departed, ["10.0.0.2:80"]);
        assert!(s.take_departed().is_empty());
        // A file that does not parse: refused, the previous endpoints stay.
        file(&dir, "[[services]]\nname = ");
        assert!(s.reload_file().is_err());
        assert!(
            s.view()
                .load()
                .endpoint("10.0.0.3:80".parse().unwrap())
                .is_some()
        );
        // Cloud Map claiming the file's address for another family: refused, kept.
        let clash = vec![cloudmap_ep("10.0.0.3:80", "other")];
        assert!(s.set_cloudmap(clash).unwrap_err().contains("10.0.0.3:80"));
        assert!(
            s.view()
                .load()
                .endpoint("10.0.0.7:90".parse().unwrap())
                .is_some()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
