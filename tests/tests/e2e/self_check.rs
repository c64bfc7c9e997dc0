//! The lab itself, without a gateway: plain routing from pods to the upstream services.

use egressgate_lab::addr;
use egressgate_lab::Lab;

use crate::support::{curl, dig};

#[test]
fn lab_self_check_reaches_every_service_without_gateway() {
    let lab = Lab::builder()
        .pods(2)
        .all_services()
        .without_gateway()
        .start()
        .expect("lab starts");
    let ca = lab.ca();

    // Trusted DNS, including the CNAME chain and AAAA.
    let answer = dig(&lab, "a", addr::API, &["@198.19.0.53"]);
    assert_eq!(
        answer,
        [format!("{}.", addr::API_CNAME), addr::WEB.to_owned()]
    );
    let aaaa = dig(&lab, "a", addr::API, &["@198.19.0.53", "AAAA"]);
    assert_eq!(aaaa.last().map(String::as_str), Some(addr::WEB6));
    // The rogue server lies, and logs the query.
    let rogue = dig(&lab, "b", addr::API, &["@198.19.0.66"]);
    assert_eq!(rogue, [addr::ROGUE_ANSWER]);
    assert_eq!(
        lab.rogue_dns_queries().len(),
        1,
        "{:?}",
        lab.rogue_dns_queries()
    );
    // The short record carries TTL 1.
    let out = lab.pod("a").run(&[
        "dig",
        "+noall",
        "+answer",
        "+time=3",
        "+tries=1",
        addr::SHORT,
    ]);
    let fields: Vec<&str> = out.stdout.split_whitespace().collect();
    assert_eq!(fields.get(1), Some(&"1"), "{out}");

    // HTTPS and HTTP by name, per virtual host, IPv4 and IPv6.
    for name in [addr::API, addr::EVIL, addr::OTHER] {
        let out = lab.pod("a").run(&curl(&ca, &[&format!("https://{name}/")]));
        assert!(out.success(), "{out}");
        assert_eq!(out.stdout.trim(), format!("hello from {name}"));
    }
    let out = lab.pod("a").run(&curl(&ca, &["http://api.example.test/"]));
    assert!(out.success(), "{out}");
    assert_eq!(out.stdout.trim(), "hello from api.example.test");
    let out = lab.pod("b").run(&[
        "curl",
        "-sS",
        "-6",
        "--max-time",
        "10",
        "--cacert",
        &ca,
        "https://api.example.test/",
    ]);
    assert!(out.success(), "{out}");
    assert_eq!(out.stdout.trim(), "hello from api.example.test");

    // The openssl client the TLS tests use: SNI, verified, request on stdin.
    let out = lab.pod("a").run_stdin(
        &[
            "openssl",
            "s_client",
            "-4",
            "-connect",
            "api.example.test:443",
            "-servername",
            addr::API,
            "-CAfile",
            &ca,
            "-verify_return_error",
            "-ign_eof",
            "-quiet",
        ],
        "GET / HTTP/1.0\r\nHost: api.example.test\r\n\r\n",
    );
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("hello from api.example.test"), "{out}");

    // PostgreSQL with TLS and without.
    for sslmode in ["require", "disable"] {
        let conn = format!(
            "host=db.example.test dbname=orders user=app sslmode={sslmode} gssencmode=disable \
             connect_timeout=5"
        );
        let out = lab.pod("a").run(&["psql", &conn, "-Atc", "select 1"]);
        assert!(out.success(), "{out}");
        assert_eq!(out.stdout.trim(), "1");
    }
    let out = lab.pod("a").run(&[
        "psql",
        "host=db.example.test dbname=orders user=app sslmode=require gssencmode=disable connect_timeout=5",
        "-Atc",
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    ]);
    assert_eq!(out.stdout.trim(), "t", "{out}");
}

#[test]
fn lab_namespaces_are_removed_on_drop() {
    let lab = Lab::builder().pods(1).start().expect("lab starts");
    let names = [
        lab.node().name().to_owned(),
        lab.up().name().to_owned(),
        lab.pod("a").name().to_owned(),
    ];
    let etc = std::path::Path::new("/etc/netns").join(&names[2]);
    assert!(etc.join("resolv.conf").is_file());
    drop(lab);
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let list = String::from_utf8_lossy(&list.stdout);
    for name in &names {
        assert!(
            !list.split_whitespace().any(|n| n == name),
            "{name} left behind"
        );
    }
    assert!(!etc.exists(), "{} left behind", etc.display());
}
