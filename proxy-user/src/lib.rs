//! ecsmesh: one proxy per ECS container instance, fed by eBPF connect() redirection.
pub mod admin;
pub mod cgroup;
pub mod config;
pub mod ebpf;
pub mod metrics;
pub mod proxy;
pub mod run;
pub mod types;
