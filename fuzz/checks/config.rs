//! What must hold for the gateway's own file loaders on any text: the configuration file
//! (`egressgate::config::Config::parse`, then the nftables script rendered from it), the static
//! identity file (`egressgate::identity::Identities::parse`) and the node's resolv.conf.
//!
//! Shared, not copied: the cargo-fuzz target `fuzz_targets/config.rs` and the stable replay test
//! `gateway/tests/fuzz_corpus.rs` both include this file with `#[path]`. A violated property
//! panics. Files are read with `read_to_string`, so only UTF-8 reaches the parsers.

use std::net::IpAddr;

use egressgate::config::{resolv_conf_nameservers, Config};
use egressgate::identity::Identities;
use egressgate::nft;

const FILE: &str = "fuzz.yaml";

pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(FILE, text) {
        Ok(config) => {
            let _ = (config.peek.timeout(), config.dns.upstream_timeout());
            let _ = config.connections.idle_timeout();
            check_nft_script(&config);
        }
        Err(error) => assert!(error.to_string().starts_with(FILE)),
    }
    match Identities::parse(FILE, text) {
        Ok(identities) => {
            let probe = IpAddr::from([198, 18, 1, 2]);
            if let Some(pod) = identities.lookup(probe) {
                assert!(
                    pod.ips.contains(&probe),
                    "found under an address it does not have"
                );
            }
        }
        Err(error) => assert!(error.to_string().starts_with(FILE)),
    }
    for server in resolv_conf_nameservers(text) {
        assert_eq!(server.port(), 53);
    }
}

/// Configuration values go into `nft -f` input as text: none may add a statement, a rule or a
/// block. Outside comments, braces balance, quotes only delimit `iifname` patterns, and `;` only
/// ends the chain's type declaration.
fn check_nft_script(config: &Config) {
    let script = nft::render(config);
    let mut depth = 0_i32;
    for line in script.lines() {
        if line.trim_start().starts_with('#') {
            continue; // the generator's own comments
        }
        for byte in line.bytes() {
            match byte {
                b'{' => depth += 1,
                b'}' => depth -= 1,
                _ => {}
            }
            assert!(depth >= 0, "unbalanced braces in {line:?}");
        }
        let quotes = line.bytes().filter(|&b| b == b'"').count();
        if quotes > 0 {
            assert_eq!(quotes, 2, "quote in {line:?}");
            assert!(
                line.trim_start().starts_with("iifname \""),
                "quote in {line:?}"
            );
        }
        if line.contains(';') {
            assert!(
                line.trim_start().starts_with("type filter hook"),
                "`;` in {line:?}"
            );
        }
    }
    assert_eq!(depth, 0, "unbalanced braces");
    let table = &config.nftables.table;
    assert!(script.contains(&format!(
        "\ndelete table inet {table}\ntable inet {table} {{\n"
    )));
}
