//! Per-service traffic policy: retries, the retry budget, timeouts and opaque balancing.
//! `[traffic]` sets the defaults of every service, `[services.<name>]` overrides them for
//! one; both are parsed here, once, into [`ServicePolicy`] values.
use std::{collections::BTreeMap, time::Duration};

use http::Method;
use serde::{Deserialize, Serialize, Serializer};

use super::raw::Invalid;
use crate::balance::BudgetSettings;

pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_RETRY_BODY_LIMIT: usize = 64 * 1024;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_ATTEMPTS_CAP: u32 = 10;
const RETRY_BODY_LIMIT_CAP: usize = 16 * 1024 * 1024;

/// What one service's requests get.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePolicy {
    /// Response statuses retried (on another endpoint) for retryable requests.
    pub retry_statuses: Vec<u16>,
    /// Methods retried on a retry status or a reset (idempotent ones by default).
    #[serde(serialize_with = "methods")]
    pub retry_methods: Vec<Method>,
    /// Path prefixes whose requests are retried whatever their method.
    pub retryable_routes: Vec<String>,
    /// Attempts per request, the first included (1: no retries).
    pub max_attempts: u32,
    /// Request bodies up to this size are kept for a retry; larger ones are not retried.
    pub retry_body_limit: usize,
    pub budget: BudgetSettings,
    /// Getting a tunnel stream to the endpoint (a dial included).
    pub connect_timeout: Duration,
    /// One attempt, until the response headers.
    pub per_try_timeout: Option<Duration>,
    /// The whole request, retries and backoff included, until the response headers.
    pub request_timeout: Option<Duration>,
    /// Balance opaque TCP connections over the service's endpoints instead of going to
    /// the dialled one (never for a database primary).
    pub balance: bool,
}

fn methods<S: Serializer>(m: &[Method], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(m.iter().map(Method::as_str))
}

impl Default for ServicePolicy {
    fn default() -> Self {
        Self {
            retry_statuses: vec![502, 503, 504],
            retry_methods: [
                Method::GET,
                Method::HEAD,
                Method::OPTIONS,
                Method::PUT,
                Method::DELETE,
                Method::TRACE,
            ]
            .into(),
            retryable_routes: Vec::new(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_body_limit: DEFAULT_RETRY_BODY_LIMIT,
            budget: BudgetSettings::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            per_try_timeout: None,
            request_timeout: None,
            balance: false,
        }
    }
}

impl ServicePolicy {
    /// Whether a request may be retried after the application may have seen it.
    pub fn retryable(&self, method: &Method, path: &str) -> bool {
        self.retry_methods.contains(method)
            || self.retryable_routes.iter().any(|r| path.starts_with(r))
    }
}

/// The policy of every service: defaults and per-service overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Traffic {
    pub defaults: ServicePolicy,
    pub services: BTreeMap<String, ServicePolicy>,
}

impl Traffic {
    pub fn policy(&self, service: &str) -> &ServicePolicy {
        self.services.get(service).unwrap_or(&self.defaults)
    }
}

/// `[traffic]` and each `[services.<name>]` as written; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    retry_statuses: Option<Vec<u16>>,
    retry_methods: Option<Vec<String>>,
    retryable_routes: Option<Vec<String>>,
    max_attempts: Option<u32>,
    retry_body_limit_bytes: Option<usize>,
    retry_budget_percent: Option<u32>,
    retry_budget_min_per_sec: Option<u32>,
    connect_timeout_ms: Option<u64>,
    per_try_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    balance: Option<bool>,
}

fn millis(field: String, ms: u64) -> Result<Duration, Invalid> {
    match ms {
        0 => Err((field, "must be at least 1".into())),
        ms if ms > 86_400_000 => Err((field, "must be at most a day".into())),
        ms => Ok(Duration::from_millis(ms)),
    }
}

impl RawPolicy {
    /// `base` with this table's fields over it; `at` names the table in errors.
    fn over(self, base: &ServicePolicy, at: &str) -> Result<ServicePolicy, Invalid> {
        let f = |name: &str| format!("{at}.{name}");
        let mut p = base.clone();
        if let Some(statuses) = self.retry_statuses {
            if let Some(bad) = statuses.iter().find(|s| !(100..=599).contains(*s)) {
                return Err((f("retry_statuses"), format!("{bad} is not an HTTP status")));
            }
            p.retry_statuses = statuses;
        }
        if let Some(methods) = self.retry_methods {
            p.retry_methods = methods
                .iter()
                .map(|m| {
                    Method::from_bytes(m.as_bytes())
                        .ok()
                        .filter(|_| !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()))
                        .ok_or_else(|| {
                            (
                                f("retry_methods"),
                                format!("{m:?} is not an HTTP method (upper case, like \"GET\")"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(routes) = self.retryable_routes {
            if let Some(bad) = routes.iter().find(|r| !r.starts_with('/')) {
                return Err((f("retryable_routes"), format!("{bad:?} must start with /")));
            }
            p.retryable_routes = routes;
        }
        if let Some(n) = self.max_attempts {
            if !(1..=MAX_ATTEMPTS_CAP).contains(&n) {
                return Err((
                    f("max_attempts"),
                    format!("must be 1 to {MAX_ATTEMPTS_CAP} (1: no retries)"),
                ));
            }
            p.max_attempts = n;
        }
        if let Some(n) = self.retry_body_limit_bytes {
            if n > RETRY_BODY_LIMIT_CAP {
                return Err((
                    f("retry_body_limit_bytes"),
                    format!("must be at most {RETRY_BODY_LIMIT_CAP}"),
                ));
            }
            p.retry_body_limit = n;
        }
        if let Some(pct) = self.retry_budget_percent {
            if pct > 100 {
                return Err((f("retry_budget_percent"), "must be 0 to 100".into()));
            }
            p.budget.ratio = f64::from(pct) / 100.0;
        }
        if let Some(n) = self.retry_budget_min_per_sec {
            p.budget.min_per_sec = n;
        }
        if let Some(ms) = self.connect_timeout_ms {
            p.connect_timeout = millis(f("connect_timeout_ms"), ms)?;
        }
        if let Some(ms) = self.per_try_timeout_ms {
            p.per_try_timeout = Some(millis(f("per_try_timeout_ms"), ms)?);
        }
        if let Some(ms) = self.request_timeout_ms {
            p.request_timeout = Some(millis(f("request_timeout_ms"), ms)?);
        }
        if let Some(b) = self.balance {
            p.balance = b;
        }
        Ok(p)
    }
}

pub(super) fn validate(
    defaults: Option<RawPolicy>,
    services: BTreeMap<String, RawPolicy>,
) -> Result<Traffic, Invalid> {
    let defaults = defaults
        .unwrap_or_default()
        .over(&ServicePolicy::default(), "traffic")?;
    let services = services
        .into_iter()
        .map(|(name, raw)| {
            if name.is_empty() {
                return Err(("services".into(), "a service name must not be empty".into()));
            }
            let p = raw.over(&defaults, &format!("services.{name}"))?;
            Ok((name, p))
        })
        .collect::<Result<_, _>>()?;
    Ok(Traffic { defaults, services })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Traffic, Invalid> {
        #[derive(Deserialize)]
        struct T {
            traffic: Option<RawPolicy>,
            #[serde(default)]
            services: BTreeMap<String, RawPolicy>,
        }
        let t: T = toml::from_str(text).map_err(|e| ("toml".into(), e.to_string()))?;
        validate(t.traffic, t.services)
    }

    #[test]
    fn services_override_the_defaults_field_by_field() {
        let t = parse(
            "[traffic]\nmax_attempts = 2\nper_try_timeout_ms = 500\n\
             [services.orders]\nretry_statuses = [503]\nretryable_routes = [\"/orders/\"]\n",
        )
        .unwrap();
        assert_eq!(t.defaults.max_attempts, 2);
        let o = t.policy("orders");
        assert_eq!(o.max_attempts, 2, "inherited from [traffic]");
        assert_eq!(o.per_try_timeout, Some(Duration::from_millis(500)));
        assert_eq!(o.retry_statuses, vec![503]);
        assert!(o.retryable(&Method::POST, "/orders/42"));
        assert!(!o.retryable(&Method::POST, "/pay"));
        assert!(o.retryable(&Method::GET, "/pay"));
        assert_eq!(t.policy("other"), &t.defaults);
    }

    #[test]
    fn bad_values_name_the_field() {
        for (text, field) in [
            ("[traffic]\nmax_attempts = 0", "traffic.max_attempts"),
            (
                "[services.a]\nretry_statuses = [700]",
                "services.a.retry_statuses",
            ),
            (
                "[services.a]\nretry_methods = [\"get\"]",
                "services.a.retry_methods",
            ),
            (
                "[services.a]\nretryable_routes = [\"x\"]",
                "services.a.retryable_routes",
            ),
            (
                "[services.a]\nper_try_timeout_ms = 0",
                "services.a.per_try_timeout_ms",
            ),
            (
                "[services.a]\nretry_budget_percent = 101",
                "services.a.retry_budget_percent",
            ),
        ] {
            let (f, _) = parse(text).unwrap_err();
            assert_eq!(f, field, "{text}");
        }
        assert!(parse("[traffic]\nbogus = 1").is_err());
    }
}
