//! Task-role attestation, the client side (sidecars): the task's IAM role credentials
//! from the ECS agent's credential endpoint sign an `sts:GetCallerIdentity` request bound
//! to this issuer and this CSR; the issuer sends it to STS (see `issuer::sts`). No node,
//! no key material in the task definition: the task is what its role session says.
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::{
    http_request::{SignableBody, SignableRequest, SigningSettings, sign},
    sign::v4,
};
use bytes::Bytes;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde::Deserialize;

use super::{Call, RemoteError, RemoteIssuer, csr, wire};
use crate::identity::{
    IdentityError, Svid, Usage,
    protocol::{self, BINDING_HEADER, GET_CALLER_IDENTITY, SignedStsRequest, TaskAttestRequest},
};

/// Where the ECS agent serves a task's role credentials (`AWS_CONTAINER_CREDENTIALS_*`).
const ECS_CREDENTIALS_HOST: &str = "http://169.254.170.2";

/// How a task proves itself.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TaskRoleConfig {
    /// The STS endpoint the issuer forwards to (the request is signed for it).
    #[serde(serialize_with = "crate::config::display")]
    pub sts_url: http::Uri,
    pub region: String,
    /// The credential endpoint; `None`: from the environment the ECS agent sets.
    #[serde(serialize_with = "optional")]
    pub credentials_url: Option<http::Uri>,
}

fn optional<S: serde::Serializer>(v: &Option<http::Uri>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(u) => s.collect_str(u),
        None => s.serialize_none(),
    }
}

/// The agent's answer (the AWS SDKs' "container credentials" format).
#[derive(Deserialize)]
struct ContainerCredentials {
    #[serde(rename = "AccessKeyId")]
    access_key_id: String,
    #[serde(rename = "SecretAccessKey")]
    secret_access_key: String,
    #[serde(rename = "Token", default)]
    token: Option<String>,
}

impl TaskRoleConfig {
    /// The credential endpoint: configured, else `AWS_CONTAINER_CREDENTIALS_FULL_URI`,
    /// else `169.254.170.2` + `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`.
    fn credentials_url(&self) -> Result<http::Uri, String> {
        if let Some(u) = &self.credentials_url {
            return Ok(u.clone());
        }
        let text = match (
            std::env::var("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
            std::env::var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
        ) {
            (Ok(full), _) => full,
            (_, Ok(rel)) => format!("{ECS_CREDENTIALS_HOST}{rel}"),
            _ => {
                return Err(
                    "no task role credentials: AWS_CONTAINER_CREDENTIALS_RELATIVE_URI is \
                            not set (does the task definition have a taskRoleArn?)"
                        .into(),
                );
            }
        };
        text.parse().map_err(|e| format!("{text:?}: {e}"))
    }

    async fn credentials(&self) -> Result<Credentials, String> {
        let url = self.credentials_url()?;
        let target = wire::authority(&url)?;
        let token = std::env::var("AWS_CONTAINER_AUTHORIZATION_TOKEN").ok();
        let mut headers = Vec::new();
        if let Some(t) = &token {
            headers.push(("authorization", t.as_str()));
        }
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let (status, body) = wire::http_call(
            &target,
            None,
            http::Method::GET,
            path,
            &headers,
            Bytes::new(),
        )
        .await
        .map_err(|e| format!("task credentials at {url}: {e}"))?;
        if status != 200 {
            return Err(format!("task credentials at {url}: HTTP {status}"));
        }
        let c: ContainerCredentials =
            serde_json::from_str(&body).map_err(|e| format!("task credentials at {url}: {e}"))?;
        Ok(Credentials::new(
            c.access_key_id,
            c.secret_access_key,
            c.token,
            None,
            "ecs-task-role",
        ))
    }
}

/// A SigV4-signed `POST` of `GetCallerIdentity` to `sts_url`, with `binding` in a signed
/// header. The headers returned are exactly those signed, `host` included.
pub fn sign_get_caller_identity(
    creds: &Credentials,
    region: &str,
    sts_url: &http::Uri,
    binding: &str,
    at: SystemTime,
) -> Result<SignedStsRequest, String> {
    let host = sts_url
        .authority()
        .ok_or_else(|| format!("{sts_url}: no host"))?
        .as_str()
        .to_owned();
    let url = format!("{}://{host}/", sts_url.scheme_str().unwrap_or("https"));
    let mut headers = vec![
        ("host".to_owned(), host),
        (
            "content-type".to_owned(),
            "application/x-www-form-urlencoded; charset=utf-8".to_owned(),
        ),
        (BINDING_HEADER.to_owned(), binding.to_owned()),
    ];
    let identity = creds.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let signable = SignableRequest::new(
        "POST",
        &url,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(GET_CALLER_IDENTITY.as_bytes()),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    for (name, value) in instructions.headers() {
        headers.push((name.to_ascii_lowercase(), value.to_owned()));
    }
    Ok(SignedStsRequest {
        url,
        headers,
        body: GET_CALLER_IDENTITY.to_owned(),
    })
}

impl RemoteIssuer {
    /// `POST /v1/task`: an SVID for this task, proven by its own role credentials.
    pub(super) async fn task_svid(
        &self,
        cfg: &TaskRoleConfig,
        task_arn: &str,
    ) -> Result<Svid, RemoteError> {
        let creds = cfg
            .credentials()
            .await
            .map_err(|message| RemoteError::Credentials { message })?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IdentityError::from)?;
        let csr = csr(&key)?;
        let binding = protocol::binding(&protocol::issuer_id(&self.cfg.trust_domain), &csr);
        let sts = sign_get_caller_identity(
            &creds,
            &cfg.region,
            &cfg.sts_url,
            &binding,
            SystemTime::now(),
        )
        .map_err(|message| RemoteError::Credentials { message })?;
        let body = TaskAttestRequest {
            task_arn: task_arn.to_owned(),
            csr,
            sts,
        };
        let issued = self.call(Call::Task, &body).await?;
        let (svid, _) = self.accept(Call::Task, &issued, key, Usage::Server)?;
        self.note(Call::Task, "issued");
        Ok(svid)
    }
}
