//! Task-role attestation, after HashiCorp Vault's AWS IAM auth method: a task signs
//! `sts:GetCallerIdentity` with its own IAM task-role credentials and hands the signed
//! request to the issuer, which checks its shape and binding here and then sends it to
//! **its own** configured STS endpoint. STS verifies the signature; its answer names the
//! caller, `arn:aws:sts::<account>:assumed-role/<role>/<session>`, and ECS names a task's
//! role session after the task id.
//!
//! What is checked before anything is sent: the request is a `POST` of exactly
//! [`GET_CALLER_IDENTITY`] to the configured endpoint (so a task cannot point the issuer at
//! a server of its own), `host`, `x-amz-date` and [`BINDING_HEADER`] are covered by the
//! signature, the binding names this issuer and this CSR, and the signature is fresh.
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::Refused;
use crate::identity::{
    protocol::{BINDING_HEADER, GET_CALLER_IDENTITY, Reason, SignedStsRequest},
    remote::wire,
};

/// How far `x-amz-date` may be from the issuer's clock (STS itself allows 15 minutes).
pub const MAX_SKEW: Duration = Duration::from_secs(5 * 60);

/// The only headers forwarded to STS; anything else is refused rather than dropped, so
/// what STS verifies is exactly what the task signed.
const FORWARDED: [&str; 7] = [
    "host",
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
    "content-type",
    BINDING_HEADER,
];

/// The caller STS named: a role session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSession {
    pub account: String,
    pub role: String,
    pub session: String,
}

/// STS's answer to a forwarded request: status and body.
#[async_trait]
pub trait Sts: Send + Sync {
    async fn send(&self, req: &SignedStsRequest) -> Result<(u16, String), String>;
}

/// STS over HTTP(S) at one endpoint.
pub struct HttpSts {
    url: http::Uri,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl HttpSts {
    /// `https://` endpoints are verified against the system's roots (STS has a public
    /// certificate); `http://` is for tests (moto).
    pub fn new(url: http::Uri) -> Result<Self, String> {
        let tls = match url.scheme_str() {
            Some("https") => {
                let mut roots = rustls::RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err("no system root certificates to verify STS with".into());
                }
                let cfg = rustls::ClientConfig::builder_with_provider(crate::identity::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(std::sync::Arc::new(cfg))
            }
            Some("http") => None,
            _ => return Err(format!("{url}: want http:// or https://")),
        };
        Ok(Self { url, tls })
    }
}

#[async_trait]
impl Sts for HttpSts {
    async fn send(&self, req: &SignedStsRequest) -> Result<(u16, String), String> {
        let target = wire::authority(&self.url)?;
        let headers: Vec<(&str, &str)> = req
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let tls = self.tls.clone().map(|c| (c, target.0.clone()));
        wire::http_call(
            &target,
            tls,
            http::Method::POST,
            "/",
            &headers,
            Bytes::from(req.body.clone()),
        )
        .await
    }
}

/// The shape checks, before the request goes anywhere.
pub fn check(
    req: &SignedStsRequest,
    sts_url: &http::Uri,
    binding: &str,
    now: SystemTime,
) -> Result<(), Refused> {
    let malformed = |m: String| Refused::new(Reason::MalformedAttestation, m);
    let url: http::Uri = req
        .url
        .parse()
        .map_err(|e| malformed(format!("sts.url: {e}")))?;
    if url.scheme() != sts_url.scheme()
        || url.authority() != sts_url.authority()
        || url.path() != "/"
        || url.query().is_some()
    {
        return Err(malformed(format!(
            "signed for {url}; this issuer asks STS at {sts_url}"
        )));
    }
    if req.body != GET_CALLER_IDENTITY {
        return Err(malformed(format!(
            "the body must be exactly {GET_CALLER_IDENTITY:?}"
        )));
    }
    if req.headers.len() > FORWARDED.len() {
        return Err(malformed("too many headers".into()));
    }
    let mut seen = Vec::new();
    for (name, _) in &req.headers {
        if !FORWARDED.contains(&name.as_str()) {
            return Err(malformed(format!("header {name:?} is not accepted")));
        }
        if seen.contains(&name.as_str()) {
            return Err(malformed(format!("header {name:?} twice")));
        }
        seen.push(name.as_str());
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| malformed(format!("header {name} missing")))
    };
    let authority = sts_url.authority().map(|a| a.as_str()).unwrap_or_default();
    if header("host")? != authority {
        return Err(malformed(format!("host must be {authority}")));
    }
    let auth = header("authorization")?;
    let signed = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(|| malformed("authorization is not AWS4-HMAC-SHA256".into()))?
        .split(',')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("SignedHeaders="))
        .ok_or_else(|| malformed("authorization has no SignedHeaders".into()))?;
    let signed: Vec<&str> = signed.split(';').collect();
    for must in ["host", "x-amz-date", BINDING_HEADER] {
        if !signed.contains(&must) {
            return Err(malformed(format!("the signature does not cover {must}")));
        }
    }
    let date = header("x-amz-date")?;
    let at = parse_amz_date(date).ok_or_else(|| malformed(format!("x-amz-date {date:?}")))?;
    let skew = match now.duration_since(at) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    if skew > MAX_SKEW {
        return Err(malformed(format!(
            "signed at {date}, more than {MAX_SKEW:?} from now"
        )));
    }
    if header(BINDING_HEADER)? != binding {
        return Err(Refused::new(
            Reason::BindingMismatch,
            "the signed request is bound to another issuer or another CSR",
        ));
    }
    Ok(())
}

/// What STS's answer means: the caller, or why not.
pub fn caller(status: u16, body: &str) -> Result<RoleSession, Refused> {
    if status >= 500 {
        return Err(Refused::new(
            Reason::StsUnavailable,
            format!("STS answered {status}"),
        ));
    }
    if status != 200 {
        let code = xml_text(body, "Code").unwrap_or("unknown");
        return Err(Refused::new(
            Reason::ForgedAttestation,
            format!("STS refused the signed request ({status} {code})"),
        ));
    }
    let arn = xml_text(body, "Arn")
        .ok_or_else(|| Refused::new(Reason::StsUnavailable, "STS answer without an Arn"))?;
    role_session(arn).ok_or_else(|| {
        Refused::new(
            Reason::NotTaskCredentials,
            format!("{arn} is not an assumed-role session (a task role's credentials)"),
        )
    })
}

/// `arn:<partition>:sts::<account>:assumed-role/<role>/<session>`.
pub fn role_session(arn: &str) -> Option<RoleSession> {
    let Some(crate::types::Arn {
        service: "sts",
        region: "",
        account,
        resource: res,
        ..
    }) = crate::types::Arn::parse(arn)
    else {
        return None;
    };
    let mut res = res.split('/');
    let (Some("assumed-role"), Some(role), Some(session), None) =
        (res.next(), res.next(), res.next(), res.next())
    else {
        return None;
    };
    (!account.is_empty() && !role.is_empty() && !session.is_empty()).then(|| RoleSession {
        account: account.to_owned(),
        role: role.to_owned(),
        session: session.to_owned(),
    })
}

/// The text of the first `<tag>…</tag>` (STS answers are small, flat XML).
fn xml_text<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&format!("</{tag}>"))?;
    Some(body[start..start + end].trim())
}

/// `YYYYMMDDTHHMMSSZ`.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let format =
        time::format_description::parse_borrowed::<2>("[year][month][day]T[hour][minute][second]Z")
            .ok()?;
    let at = time::PrimitiveDateTime::parse(s, &format)
        .ok()?
        .assume_utc();
    let secs = u64::try_from(at.unix_timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}
