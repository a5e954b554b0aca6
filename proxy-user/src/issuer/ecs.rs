//! What the issuer asks ECS, behind [`EcsView`] so the issuing logic is tested without
//! AWS: container instances of the cluster (by EC2 instance id), tasks, and task
//! definitions. [`Cached`] puts short-lived caches in front of any view (task definitions
//! are immutable and cached for good); [`AwsEcs`] is the SDK-backed view.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;

/// How long the cluster's container instance list is reused.
pub const INSTANCES_TTL: Duration = Duration::from_secs(5);
/// How long a task's description is reused (a node asks once per task and refresh).
pub const TASK_TTL: Duration = Duration::from_secs(2);
/// Cached tasks beyond this are swept of expired entries.
const MAX_CACHED_TASKS: usize = 10_000;

#[derive(Debug, Clone, thiserror::Error)]
#[error("ECS {operation}: {message}")]
pub struct EcsError {
    pub operation: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInstance {
    pub arn: String,
    /// ACTIVE, DRAINING, INACTIVE, REGISTERING, ...
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub arn: String,
    pub container_instance_arn: Option<String>,
    pub last_status: String,
    pub task_definition_arn: String,
    /// `service:<name>` for tasks of a service, `family:<name>` for others.
    pub group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskDefinition {
    pub family: String,
    pub task_role_arn: Option<String>,
}

#[async_trait]
pub trait EcsView: Send + Sync {
    /// The container instance of the cluster running on this EC2 instance.
    async fn container_instance(
        &self,
        ec2_instance_id: &str,
    ) -> Result<Option<ContainerInstance>, EcsError>;
    async fn task(&self, arn: &str) -> Result<Option<Task>, EcsError>;
    async fn task_definition(&self, arn: &str) -> Result<Option<TaskDefinition>, EcsError>;
}

/// Every container instance of the cluster, by EC2 instance id (one list per refresh:
/// a node asking is almost always one of them, and ECS has no lookup by EC2 id).
pub type InstanceMap = HashMap<String, ContainerInstance>;

/// A view that can list all container instances at once.
#[async_trait]
pub trait InstanceLister: Send + Sync {
    async fn all_instances(&self) -> Result<InstanceMap, EcsError>;
}

/// Caches in front of a view.
pub struct Cached<V> {
    inner: V,
    instances: tokio::sync::Mutex<Option<(Instant, Arc<InstanceMap>)>>,
    tasks: Mutex<HashMap<String, (Instant, Option<Task>)>>,
    definitions: Mutex<HashMap<String, TaskDefinition>>,
}

impl<V> Cached<V> {
    pub fn new(inner: V) -> Self {
        Self {
            inner,
            instances: tokio::sync::Mutex::new(None),
            tasks: Mutex::new(HashMap::new()),
            definitions: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl<V: EcsView + InstanceLister> EcsView for Cached<V> {
    async fn container_instance(
        &self,
        ec2_instance_id: &str,
    ) -> Result<Option<ContainerInstance>, EcsError> {
        // Held across the refresh: concurrent requests wait for one listing.
        let mut slot = self.instances.lock().await;
        let map = match slot.as_ref() {
            Some((at, map)) if at.elapsed() < INSTANCES_TTL => map.clone(),
            _ => {
                let map = Arc::new(self.inner.all_instances().await?);
                *slot = Some((Instant::now(), map.clone()));
                map
            }
        };
        Ok(map.get(ec2_instance_id).cloned())
    }

    async fn task(&self, arn: &str) -> Result<Option<Task>, EcsError> {
        if let Some((at, t)) = lock(&self.tasks).get(arn)
            && at.elapsed() < TASK_TTL
        {
            return Ok(t.clone());
        }
        let t = self.inner.task(arn).await?;
        let mut tasks = lock(&self.tasks);
        if tasks.len() >= MAX_CACHED_TASKS {
            tasks.retain(|_, (at, _)| at.elapsed() < TASK_TTL);
        }
        tasks.insert(arn.to_owned(), (Instant::now(), t.clone()));
        Ok(t)
    }

    async fn task_definition(&self, arn: &str) -> Result<Option<TaskDefinition>, EcsError> {
        if let Some(d) = lock(&self.definitions).get(arn) {
            return Ok(Some(d.clone()));
        }
        let d = self.inner.task_definition(arn).await?;
        if let Some(d) = &d {
            lock(&self.definitions).insert(arn.to_owned(), d.clone());
        }
        Ok(d)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// ECS through the AWS SDK.
pub struct AwsEcs {
    client: aws_sdk_ecs::Client,
    cluster: String,
}

impl AwsEcs {
    pub fn new(config: &aws_config::SdkConfig, cluster: String) -> Self {
        Self {
            client: aws_sdk_ecs::Client::new(config),
            cluster,
        }
    }
}

fn sdk_error<E: std::error::Error + 'static>(
    operation: &'static str,
) -> impl FnOnce(aws_sdk_ecs::error::SdkError<E, aws_smithy_runtime_api::http::Response>) -> EcsError
{
    move |e| EcsError {
        operation,
        message: aws_sdk_ecs::error::DisplayErrorContext(e).to_string(),
    }
}

#[async_trait]
impl InstanceLister for AwsEcs {
    async fn all_instances(&self) -> Result<InstanceMap, EcsError> {
        let mut arns = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self
                .client
                .list_container_instances()
                .cluster(&self.cluster)
                .set_next_token(next.take())
                .send()
                .await
                .map_err(sdk_error("ListContainerInstances"))?;
            arns.extend(page.container_instance_arns().iter().cloned());
            match page.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_owned()),
                _ => break,
            }
        }
        let mut map = InstanceMap::new();
        // DescribeContainerInstances takes at most 100 at a time.
        for chunk in arns.chunks(100) {
            let out = self
                .client
                .describe_container_instances()
                .cluster(&self.cluster)
                .set_container_instances(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(sdk_error("DescribeContainerInstances"))?;
            for ci in out.container_instances() {
                if let (Some(ec2), Some(arn)) = (ci.ec2_instance_id(), ci.container_instance_arn())
                {
                    map.insert(
                        ec2.to_owned(),
                        ContainerInstance {
                            arn: arn.to_owned(),
                            status: ci.status().unwrap_or_default().to_owned(),
                        },
                    );
                }
            }
        }
        Ok(map)
    }
}

#[async_trait]
impl EcsView for AwsEcs {
    async fn container_instance(
        &self,
        ec2_instance_id: &str,
    ) -> Result<Option<ContainerInstance>, EcsError> {
        Ok(self.all_instances().await?.remove(ec2_instance_id))
    }

    async fn task(&self, arn: &str) -> Result<Option<Task>, EcsError> {
        let out = self
            .client
            .describe_tasks()
            .cluster(&self.cluster)
            .tasks(arn)
            .send()
            .await
            .map_err(sdk_error("DescribeTasks"))?;
        Ok(out
            .tasks()
            .iter()
            .find(|t| t.task_arn() == Some(arn))
            .map(|t| Task {
                arn: arn.to_owned(),
                container_instance_arn: t.container_instance_arn().map(str::to_owned),
                last_status: t.last_status().unwrap_or_default().to_owned(),
                task_definition_arn: t.task_definition_arn().unwrap_or_default().to_owned(),
                group: t.group().map(str::to_owned),
            }))
    }

    async fn task_definition(&self, arn: &str) -> Result<Option<TaskDefinition>, EcsError> {
        let out = self
            .client
            .describe_task_definition()
            .task_definition(arn)
            .send()
            .await
            .map_err(sdk_error("DescribeTaskDefinition"))?;
        Ok(out.task_definition().and_then(|d| {
            Some(TaskDefinition {
                family: d.family()?.to_owned(),
                task_role_arn: d.task_role_arn().map(str::to_owned),
            })
        }))
    }
}
