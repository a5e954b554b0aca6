//! The kernel programs' counters, exported on scrape.
use std::sync::{Arc, OnceLock};

/// The kernel programs' counters (`ecsmesh_kernel_connects_total{verdict}`), read from the
/// per-CPU map at each scrape; nothing is exported until the programs are installed.
#[derive(Clone, Debug, Default)]
pub struct KernelCounters(Arc<OnceLock<Arc<crate::ebpf::KernelStats>>>);

impl KernelCounters {
    pub fn set(&self, stats: Arc<crate::ebpf::KernelStats>) {
        let _ = self.0.set(stats);
    }
}

impl prometheus_client::collector::Collector for KernelCounters {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let Some(stats) = self.0.get() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "kernel_connects",
            "TCP connects seen by the eBPF connect hooks of enrolled tasks, by verdict",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (verdict, value) in stats.read() {
            let labels = [("verdict", verdict)];
            prometheus_client::metrics::counter::ConstCounter::new(value)
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
