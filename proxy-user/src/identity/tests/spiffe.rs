use rustls_pki_types::ServerName;

use crate::identity::{
    DEFAULT_TEMPLATE, IdentityError, IdentityTemplate, SpiffeId, TemplateVars, TrustDomain,
};

fn vars() -> TemplateVars {
    TemplateVars {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        cluster: "prod".into(),
        family: "orders".into(),
        service: None,
        task_role: None,
    }
}

#[test]
fn trust_domain_accepts_spec_names_and_rejects_others() {
    for ok in ["example.org", "a", "my-td_1.internal", &"a".repeat(255)] {
        assert_eq!(TrustDomain::new(ok).unwrap().as_str(), ok);
    }
    for bad in [
        "",
        "Example.org",
        "a/b",
        "example.org:8080",
        "user@example.org",
        "ex ample",
        &"a".repeat(256),
    ] {
        assert!(
            matches!(
                TrustDomain::new(bad),
                Err(IdentityError::InvalidTrustDomain { .. })
            ),
            "{bad:?} accepted"
        );
    }
}

#[test]
fn spiffe_id_parses_into_trust_domain_and_path() {
    let id = SpiffeId::parse("spiffe://example.org/ecs/prod/orders").unwrap();
    assert_eq!(id.trust_domain().as_str(), "example.org");
    assert_eq!(id.path(), "/ecs/prod/orders");
    assert_eq!(id.to_string(), "spiffe://example.org/ecs/prod/orders");
    assert_eq!(
        serde_json::to_string(&id).unwrap(),
        "\"spiffe://example.org/ecs/prod/orders\""
    );
    let back: SpiffeId = serde_json::from_str("\"spiffe://example.org/ecs/prod/orders\"").unwrap();
    assert_eq!(back, id);
    assert!(serde_json::from_str::<SpiffeId>("\"spiffe://example.org\"").is_err());
}

#[test]
fn spiffe_id_rejects_bad_inputs() {
    for bad in [
        "",
        "example.org/a",
        "http://example.org/a",
        "SPIFFE://example.org/a",
        "spiffe://example.org",
        "spiffe://example.org/",
        "spiffe:///a",
        "spiffe://Example.org/a",
        "spiffe://user@example.org/a",
        "spiffe://example.org:8080/a",
        "spiffe://example.org/a//b",
        "spiffe://example.org/a/",
        "spiffe://example.org/./a",
        "spiffe://example.org/a/..",
        "spiffe://example.org/a?x=1",
        "spiffe://example.org/a#frag",
        "spiffe://example.org/a%20b",
        "spiffe://example.org/a b",
    ] {
        assert!(
            matches!(
                SpiffeId::parse(bad),
                Err(IdentityError::InvalidSpiffeId { .. })
            ),
            "{bad:?} accepted"
        );
    }
    let long = format!("spiffe://example.org/{}", "a".repeat(2048));
    assert!(SpiffeId::parse(&long).is_err());
}

#[test]
fn sni_is_a_valid_server_name_and_stable() {
    let id = SpiffeId::parse("spiffe://example.org/ecs/prod/orders").unwrap();
    let sni = id.sni();
    // First 16 bytes of SHA-256("spiffe://example.org/ecs/prod/orders"), computed apart.
    assert_eq!(sni, "34db97d7935da8c895c0eac18cf8faf3.id.ecsmesh.internal");
    assert_eq!(sni, id.clone().sni());
    assert!(matches!(
        ServerName::try_from(sni.clone()),
        Ok(ServerName::DnsName(_))
    ));
    let other = SpiffeId::parse("spiffe://example.org/ecs/prod/payments").unwrap();
    assert_ne!(other.sni(), sni);
}

#[test]
fn default_template_renders_cluster_and_family() {
    let tpl = IdentityTemplate::new(DEFAULT_TEMPLATE).unwrap();
    assert_eq!(
        tpl.render(&vars()).unwrap().to_string(),
        "spiffe://example.org/ecs/prod/orders"
    );
    assert_eq!(IdentityTemplate::default(), tpl);
}

#[test]
fn template_renders_every_placeholder() {
    let tpl = IdentityTemplate::new(
        "spiffe://{trust_domain}/c/{cluster}/f/{family}/s/{service}/r/{task_role}",
    )
    .unwrap();
    let mut v = vars();
    v.service = Some("orders-svc".into());
    v.task_role = Some("OrdersRole".into());
    assert_eq!(
        tpl.render(&v).unwrap().to_string(),
        "spiffe://example.org/c/prod/f/orders/s/orders-svc/r/OrdersRole"
    );
}

#[test]
fn template_errors_when_a_used_value_is_missing() {
    let tpl = IdentityTemplate::new("spiffe://{trust_domain}/svc/{service}").unwrap();
    assert!(matches!(
        tpl.render(&vars()),
        Err(IdentityError::MissingTemplateValue { name: "service" })
    ));
    let tpl = IdentityTemplate::new("spiffe://{trust_domain}/role/{task_role}").unwrap();
    assert!(matches!(
        tpl.render(&vars()),
        Err(IdentityError::MissingTemplateValue { name: "task_role" })
    ));
    let mut v = vars();
    v.cluster = String::new();
    assert!(matches!(
        IdentityTemplate::default().render(&v),
        Err(IdentityError::MissingTemplateValue { name: "cluster" })
    ));
    // An unused missing value is fine.
    assert!(IdentityTemplate::default().render(&vars()).is_ok());
}

#[test]
fn template_values_cannot_add_path_segments() {
    let mut v = vars();
    v.family = "orders/admin".into();
    assert!(matches!(
        IdentityTemplate::default().render(&v),
        Err(IdentityError::InvalidTemplateValue { name: "family", .. })
    ));
}

#[test]
fn bad_templates_are_rejected_when_built() {
    for bad in [
        "spiffe://{trust_domain}/{nope}",
        "spiffe://{trust_domain}/{family",
        "spiffe://{trust_domain}/family}",
        "https://{trust_domain}/{family}",
        "spiffe://{trust_domain}",
        "spiffe://{trust_domain}//{family}",
    ] {
        assert!(
            matches!(
                IdentityTemplate::new(bad),
                Err(IdentityError::InvalidTemplate { .. })
            ),
            "{bad:?} accepted"
        );
    }
}
