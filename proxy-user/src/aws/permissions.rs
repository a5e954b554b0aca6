//! Every AWS API call the code makes, who makes it and the IAM action it needs: the one
//! list the deploy policies are checked against. The tests below find the SDK calls in
//! the source and fail when one is missing here (or listed but no longer made), and
//! compare the list with what `deploy/cloudformation.yaml` (`EcsmeshPolicy` for the node
//! proxy, `IssuerPolicy` for the issuer) and `deploy/iam-policy.json` grant: a call
//! without a grant, or a grant no call needs, fails naming both.

/// Which process makes the call, i.e. which role must allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Caller {
    /// `ecsmesh run`: the daemon task's role (or the instance role with systemd).
    Node,
    /// `ecsmesh issuer run`: the issuer task's role.
    Issuer,
}

impl Caller {
    pub fn as_str(self) -> &'static str {
        match self {
            Caller::Node => "node proxy",
            Caller::Issuer => "issuer",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AwsCall {
    pub caller: Caller,
    /// The SDK client method (`client.describe_tasks()`).
    pub method: &'static str,
    /// The IAM action it needs.
    pub action: &'static str,
    /// What for (deploy/README.md's IAM table says the same).
    pub why: &'static str,
}

pub const AWS_CALLS: &[AwsCall] = &[
    AwsCall {
        caller: Caller::Node,
        method: "put_attributes",
        action: "ecs:PutAttributes",
        why: "publish ecsmesh.ready on this container instance once ready",
    },
    AwsCall {
        caller: Caller::Node,
        method: "delete_attributes",
        action: "ecs:DeleteAttributes",
        why: "withdraw ecsmesh.ready on shutdown",
    },
    AwsCall {
        caller: Caller::Node,
        method: "discover_instances",
        action: "servicediscovery:DiscoverInstances",
        why: "meshed endpoints from Cloud Map ([cloudmap])",
    },
    AwsCall {
        caller: Caller::Issuer,
        method: "list_container_instances",
        action: "ecs:ListContainerInstances",
        why: "attestation: is the EC2 instance a container instance of the cluster",
    },
    AwsCall {
        caller: Caller::Issuer,
        method: "describe_container_instances",
        action: "ecs:DescribeContainerInstances",
        why: "attestation: its EC2 instance id and status (ACTIVE/DRAINING)",
    },
    AwsCall {
        caller: Caller::Issuer,
        method: "describe_tasks",
        action: "ecs:DescribeTasks",
        why: "SVIDs: the task runs on the asking node's container instance",
    },
    AwsCall {
        caller: Caller::Issuer,
        method: "describe_task_definition",
        action: "ecs:DescribeTaskDefinition",
        why: "SVIDs: family and task role for the identity template",
    },
    AwsCall {
        caller: Caller::Issuer,
        method: "get_secret_value",
        action: "secretsmanager:GetSecretValue",
        why: "the issuing CA (ca_secret)",
    },
];

/// The IAM actions `caller` needs, sorted.
pub fn actions(caller: Caller) -> Vec<&'static str> {
    let mut v: Vec<_> = AWS_CALLS
        .iter()
        .filter(|c| c.caller == caller)
        .map(|c| c.action)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests;
