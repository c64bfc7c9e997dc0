//! The gateway installs its nftables table, and `nft-rules` prints what it installs.

use egressgate_lab::{GatewayOptions, Lab};

use crate::support::SHOP_POLICY;

#[test]
fn gateway_installs_tproxy_rules_and_prints_them() {
    let lab = Lab::builder()
        .pods(1)
        .dns()
        .gateway(GatewayOptions::default().policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts");
    let listed = lab
        .node()
        .run(&["nft", "list", "table", "inet", "egressgate"]);
    assert!(listed.success(), "{listed}");
    for needle in ["tproxy", "15001", "15053", "egp*"] {
        assert!(
            listed.stdout.contains(needle),
            "no {needle:?} in:\n{listed}"
        );
    }

    let gateway = lab.gateway();
    let bin = gateway.bin().display().to_string();
    let config = gateway.config_path().display().to_string();
    let printed = lab.node().run(&[&bin, "nft-rules", "--config", &config]);
    assert!(printed.success(), "{printed}");
    assert!(printed.stdout.contains("egressgate"), "{printed}");
    assert!(printed.stdout.contains("tproxy"), "{printed}");
    assert!(printed.stdout.contains("15001"), "{printed}");
}
