//! PostgreSQL startup checks: database and user allow-lists, and encrypted sessions.

use egressgate_lab::{GatewayOptions, Lab, Output};

use crate::support::{assert_denied, run_and_decide};

/// role=app may reach the orders database as app, in clear text only.
pub const ORDERS_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: orders-db, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: db.example.test}]
      ports:
        - {port: 5432, protocol: postgresql, postgresql: {databases: [orders], users: [app], allowEncrypted: false}}
"#;

const ENCRYPTED_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: orders-db-tls, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: db.example.test}]
      ports:
        - {port: 5432, protocol: postgresql, postgresql: {databases: [orders], users: [app], allowEncrypted: true}}
"#;

fn psql(db: &str, user: &str, sslmode: &str) -> Vec<String> {
    vec![
        "psql".to_owned(),
        format!(
            "host=db.example.test dbname={db} user={user} sslmode={sslmode} gssencmode=disable \
             connect_timeout=5"
        ),
        "-Atc".to_owned(),
        "select 1".to_owned(),
    ]
}

fn run_psql(lab: &Lab, db: &str, user: &str, sslmode: &str) -> (Output, egressgate_lab::Decision) {
    let args = psql(db, user, sslmode);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    run_and_decide(lab, "a", 5432, &argv)
}

fn db_lab(options: GatewayOptions) -> Lab {
    Lab::builder()
        .pods(1)
        .dns()
        .postgres()
        .gateway(options)
        .start()
        .expect("lab starts")
}

#[test]
fn postgresql_startup_is_checked_against_databases_users_and_encryption() {
    let lab = db_lab(GatewayOptions::default().policy("db.yaml", ORDERS_POLICY));

    let (out, d) = run_psql(&lab, "orders", "app", "disable");
    assert!(out.success(), "{out}\n{d}");
    assert_eq!(out.stdout.trim(), "1", "{out}");
    assert_eq!(d.verdict(), Some("allow"), "{d}");
    assert_eq!(d.reason(), Some("allowed"), "{d}");
    assert_eq!(d.protocol(), Some("postgresql"), "{d}");
    assert_eq!(d.database(), Some("orders"), "{d}");
    assert_eq!(d.user(), Some("app"), "{d}");

    let (out, d) = run_psql(&lab, "other", "app", "disable");
    assert_denied(&out, &d, &["postgresql_denied"]);
    assert_eq!(d.database(), Some("other"), "{d}");

    let (out, d) = run_psql(&lab, "orders", "intruder", "disable");
    assert_denied(&out, &d, &["postgresql_denied"]);
    assert_eq!(d.user(), Some("intruder"), "{d}");

    let (out, d) = run_psql(&lab, "orders", "app", "require");
    assert_denied(&out, &d, &["postgresql_encrypted"]);
}

#[test]
fn postgresql_encrypted_session_is_allowed_by_a_policy_that_allows_it() {
    let lab = db_lab(
        GatewayOptions::default()
            .policy("db.yaml", ORDERS_POLICY)
            .policy("db-tls.yaml", ENCRYPTED_POLICY),
    );
    let (out, d) = run_psql(&lab, "orders", "app", "require");
    assert!(out.success(), "{out}\n{d}");
    assert_eq!(out.stdout.trim(), "1", "{out}");
    assert_eq!(d.verdict(), Some("allow"), "{d}");
    assert_eq!(d.reason(), Some("allowed"), "{d}");
}

/// libpq 17's `sslnegotiation=direct` starts with a ClientHello carrying ALPN `postgresql`. The
/// lab's psql is older, so openssl sends that ClientHello; only the decision is checked (the
/// lab's server may not speak direct TLS).
fn direct_tls(lab: &Lab) -> egressgate_lab::Decision {
    let args = [
        "openssl",
        "s_client",
        "-4",
        "-connect",
        "db.example.test:5432",
        "-alpn",
        "postgresql",
        "-servername",
        "db.example.test",
        "-quiet",
    ];
    let (_, decision) = run_and_decide(lab, "a", 5432, &args);
    decision
}

#[test]
fn postgresql_direct_tls_follows_the_encryption_rule() {
    let lab = db_lab(GatewayOptions::default().policy("db.yaml", ENCRYPTED_POLICY));
    let d = direct_tls(&lab);
    assert_eq!(d.verdict(), Some("allow"), "{d}");
    assert_eq!(d.protocol(), Some("postgresql"), "{d}");
    assert_eq!(d.sni(), Some("db.example.test"), "{d}");
    assert_eq!(d.0["postgresqlEncryption"], "tls", "{d}");
    drop(lab);

    let lab = db_lab(GatewayOptions::default().policy("db.yaml", ORDERS_POLICY));
    let d = direct_tls(&lab);
    assert_eq!(d.verdict(), Some("deny"), "{d}");
    assert_eq!(d.reason(), Some("postgresql_encrypted"), "{d}");
}
