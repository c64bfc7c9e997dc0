//! The egressgate demo: builds a lab with the real gateway and [`DEMO_POLICY`], runs real
//! clients from the pods (TLS, HTTP, PostgreSQL, a rogue DNS server), and prints one row per
//! client with the gateway's verdict. Exits 1 if any row disagrees with what was expected, 2 if
//! the lab could not start. Needs root and `cargo build -p egressgate` (see `egressgate_bin`).

use std::process::ExitCode;

use egressgate_lab::gateway::DECISION_TIMEOUT;
use egressgate_lab::{addr, GatewayOptions, Lab};

/// role=app: api over TLS and HTTP, the orders database as `app` in clear text.
/// role=batch: api over TLS only, in audit mode (logs would-be denials, blocks nothing).
const DEMO_POLICY: &str = r#"apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: app, namespace: shop}
spec:
  podSelector: {matchLabels: {role: app}}
  egress:
    - to: [{dnsName: api.example.test}]
      ports:
        - {port: 443, protocol: tls}
        - {port: 80, protocol: http}
    - to: [{dnsName: db.example.test}]
      ports:
        - {port: 5432, protocol: postgresql, postgresql: {databases: [orders], users: [app], allowEncrypted: false}}
---
apiVersion: egressgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: batch, namespace: shop}
spec:
  podSelector: {matchLabels: {role: batch}}
  mode: audit
  egress:
    - to: [{dnsName: api.example.test}]
      ports: [{port: 443, protocol: tls}]
"#;

/// One client run: `{ca}` in the command is replaced by the lab certificate's path.
struct Row {
    pod: &'static str,
    port: u16,
    command: &'static [&'static str],
    /// Expected verdict, and the reason (`None` = any reason).
    verdict: &'static str,
    reason: Option<&'static str>,
}

const ROWS: &[Row] = &[
    Row {
        pod: "a",
        port: 443,
        command: &["curl", "-sS4", "--max-time", "10", "--cacert", "{ca}", "https://api.example.test/"],
        verdict: "allow",
        reason: Some("allowed"),
    },
    Row {
        pod: "a",
        port: 80,
        command: &["curl", "-sS4", "--max-time", "10", "http://api.example.test/"],
        verdict: "allow",
        reason: Some("allowed"),
    },
    // evil.example.test shares api's address, which pod a resolved in row 2: the address is
    // allowed, the name in the ClientHello is not.
    Row {
        pod: "a",
        port: 443,
        command: &["curl", "-sS4", "--max-time", "10", "--cacert", "{ca}", "https://evil.example.test/"],
        verdict: "deny",
        reason: Some("sni_mismatch"),
    },
    Row {
        pod: "a",
        port: 443,
        command: &[
            "curl", "-sS4", "--max-time", "10", "--cacert", "{ca}", "--resolve",
            "other.example.test:443:198.19.0.10", "https://other.example.test/",
        ],
        verdict: "deny",
        reason: None,
    },
    Row {
        pod: "a",
        port: 80,
        command: &[
            "curl", "-sS4", "--max-time", "10", "-H", "Host: evil.example.test",
            "http://api.example.test/",
        ],
        verdict: "deny",
        reason: Some("host_mismatch"),
    },
    Row {
        pod: "a",
        port: 443,
        command: &["curl", "-sS4", "--max-time", "10", "http://api.example.test:443/"],
        verdict: "deny",
        reason: Some("protocol_mismatch"),
    },
    Row {
        pod: "a",
        port: 5432,
        command: &[
            "psql",
            "host=db.example.test dbname=orders user=app sslmode=disable gssencmode=disable connect_timeout=5",
            "-Atc", "select 1",
        ],
        verdict: "allow",
        reason: Some("allowed"),
    },
    Row {
        pod: "a",
        port: 5432,
        command: &[
            "psql",
            "host=db.example.test dbname=other user=app sslmode=disable gssencmode=disable connect_timeout=5",
            "-Atc", "select 1",
        ],
        verdict: "deny",
        reason: Some("postgresql_denied"),
    },
    Row {
        pod: "a",
        port: 5432,
        command: &[
            "psql",
            "host=db.example.test dbname=orders user=app sslmode=require gssencmode=disable connect_timeout=5",
            "-Atc", "select 1",
        ],
        verdict: "deny",
        reason: Some("postgresql_encrypted"),
    },
    Row {
        pod: "b",
        port: 443,
        command: &["curl", "-sS4", "--max-time", "10", "-k", "https://198.19.0.10/"],
        verdict: "audit",
        reason: Some("no_dns_record"),
    },
    Row {
        pod: "b",
        port: 443,
        command: &["curl", "-sS4", "--max-time", "10", "--cacert", "{ca}", "https://evil.example.test/"],
        verdict: "audit",
        reason: Some("not_allowed"),
    },
];

fn main() -> ExitCode {
    let lab = match Lab::builder()
        .pods(2)
        .all_services()
        .gateway(GatewayOptions::default().policy("demo.yaml", DEMO_POLICY))
        .start()
    {
        Ok(lab) => lab,
        Err(err) => {
            eprintln!("demo: the lab did not start:\n{err}");
            return ExitCode::from(2);
        }
    };
    let ca = lab.ca();
    let mut table = vec![[
        "#".to_owned(),
        "pod".to_owned(),
        "client command".to_owned(),
        "expected".to_owned(),
        "verdict".to_owned(),
        "reason".to_owned(),
        "ok".to_owned(),
    ]];
    let mut failures = 0;

    // Rogue DNS: the pod asks 198.19.0.66, the trusted upstream answers, the rogue sees nothing.
    let rogue = lab.pod("a").run(&[
        "dig",
        "+short",
        "+time=3",
        "+tries=1",
        "@198.19.0.66",
        addr::API,
    ]);
    let answer = rogue.stdout.lines().last().unwrap_or("").to_owned();
    let ok = answer == addr::WEB && lab.rogue_dns_queries().is_empty();
    failures += usize::from(!ok);
    table.push([
        "1".to_owned(),
        "a".to_owned(),
        format!("dig @{} {}", addr::ROGUE_DNS, addr::API),
        format!("answer {}", addr::WEB),
        format!("answer {}", if answer.is_empty() { "-" } else { &answer }),
        format!("rogue saw {} queries", lab.rogue_dns_queries().len()),
        mark(ok),
    ]);

    for (index, row) in ROWS.iter().enumerate() {
        let pod = lab.pod(row.pod);
        let args: Vec<String> = row.command.iter().map(|a| a.replace("{ca}", &ca)).collect();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let cursor = lab.gateway().cursor();
        let out = pod.run(&argv);
        let decision = lab
            .gateway()
            .wait_for_decision_since(cursor, |d| d.is(&pod.name, row.port), DECISION_TIMEOUT)
            .ok();
        let verdict = decision.as_ref().and_then(|d| d.verdict()).unwrap_or("-");
        let reason = decision.as_ref().and_then(|d| d.reason()).unwrap_or("-");
        // The client's fate must agree with the verdict: allow/audit get through, deny does not.
        let client_ok = out.success() == (row.verdict != "deny");
        let ok = verdict == row.verdict && row.reason.is_none_or(|r| r == reason) && client_ok;
        failures += usize::from(!ok);
        let shown: Vec<String> = row.command.iter().map(|a| shell_word(a)).collect();
        table.push([
            (index + 2).to_string(),
            row.pod.to_owned(),
            shown.join(" "),
            format!("{} {}", row.verdict, row.reason.unwrap_or("*")),
            verdict.to_owned(),
            reason.to_owned(),
            if ok || client_ok {
                mark(ok)
            } else {
                format!("{} (client exit {:?})", mark(ok), out.status)
            },
        ]);
    }
    print_table(&table);
    if failures == 0 {
        println!("\nall {} rows as expected", table.len() - 1);
        ExitCode::SUCCESS
    } else {
        println!(
            "\n{failures} of {} rows disagree with expected",
            table.len() - 1
        );
        ExitCode::from(1)
    }
}

fn mark(ok: bool) -> String {
    if ok { "ok" } else { "FAIL" }.to_owned()
}

fn shell_word(arg: &str) -> String {
    if arg.contains([' ', '"', '\'']) {
        format!("'{arg}'")
    } else {
        arg.to_owned()
    }
}

fn print_table(rows: &[[String; 7]]) {
    let mut widths = [0usize; 7];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("| {} |", cells.join(" | "));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            println!("|-{}-|", rule.join("-|-"));
        }
    }
}
