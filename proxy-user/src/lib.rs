//! ecsmesh: one proxy per ECS container instance, fed by eBPF connect() redirection.
pub mod admin;
pub mod authz;
pub mod ca_cli;
pub mod cgroup;
pub mod config;
pub mod copy;
pub mod discovery;
pub mod ebpf;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod run;
pub mod tunnel;
pub mod types;
