//! The container image (`scripts/build-image`): its entrypoint, its tools, and the gateway
//! started from its root filesystem with the chart's security settings deciding real
//! connections in the lab.

use egressgate_lab::{addr, image, Gateway, GatewayOptions, Lab};

use crate::support::{assert_allowed, assert_denied, curl, run_and_decide, SHOP_POLICY};

#[test]
fn the_image_runs_the_gateway_read_only_with_the_charts_capabilities_only() {
    let dir = image::image_dir().expect("image");
    let rootfs = dir.join("rootfs");

    // The entrypoint and command the chart relies on.
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("runtime-config.json")).expect("runtime config"),
    )
    .expect("json");
    assert_eq!(
        config["process"]["args"],
        serde_json::json!([
            "/usr/local/bin/egressgate",
            "run",
            "--config",
            "/etc/egressgate/config.yaml"
        ])
    );
    // The tools the gateway runs are in the image, and run there.
    let root = rootfs.display().to_string();
    for tool in [
        &["nft", "--version"][..],
        &["ip", "-V"],
        &["/usr/local/bin/egressgate", "--version"],
    ] {
        let mut argv = vec!["chroot", &root];
        argv.extend_from_slice(tool);
        let out = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .expect("chroot");
        assert!(out.status.success(), "{tool:?} in the image: {out:?}");
    }

    let mut lab = Lab::builder()
        .pods(1)
        .dns()
        .web()
        .gateway(GatewayOptions::default().policy("shop.yaml", SHOP_POLICY))
        .start()
        .expect("lab starts");
    drop(lab.take_gateway());
    let runner = image::runner(lab.dir(), &rootfs).expect("runner");
    let gateway = Gateway::start_named(
        lab.node(),
        runner,
        lab.gateway_config_path(),
        &[],
        lab.dir(),
        "egressgate-image",
    )
    .expect("the gateway starts from the image");
    let pid = gateway_pid(&gateway);
    lab.replace_gateway(gateway);

    // Root with NET_BIND_SERVICE (bit 10), NET_ADMIN (12) and NET_RAW (13) only, on a
    // read-only root filesystem.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let cap = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(cap("CapEff:"), "0000000000003400", "{status}");
    assert_eq!(cap("CapBnd:"), "0000000000003400", "{status}");
    assert_eq!(cap("NoNewPrivs:"), "1", "{status}");
    let write = std::fs::write(format!("/proc/{pid}/root/usr/local/bin/planted"), b"x");
    assert_eq!(
        write.err().and_then(|e| e.raw_os_error()),
        Some(30), // EROFS
        "the image's root filesystem is writable"
    );

    let ca = lab.ca();
    let (out, d) = run_and_decide(&lab, "a", 443, &curl(&ca, &["https://api.example.test/"]));
    assert_allowed(&out, &d, "hello from api.example.test");
    let (out, d) = run_and_decide(&lab, "a", 443, &curl(&ca, &["https://evil.example.test/"]));
    assert_denied(&out, &d, &["sni_mismatch", "not_allowed"]);
    assert_eq!(d.sni(), Some(addr::EVIL), "{d}");
}

/// The gateway process itself (the runner execs through unshare, sh, chroot and setpriv).
fn gateway_pid(gateway: &Gateway) -> u32 {
    let leader = gateway.daemon().pid();
    let out = std::process::Command::new("pgrep")
        .args(["-f", "/usr/local/bin/egressgate run"])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map(|s| s.contains("Name:\tegressgate"))
                .unwrap_or(false)
                && is_descendant(*pid, leader)
        })
        .unwrap_or(leader)
}

fn is_descendant(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..16 {
        if pid == ancestor {
            return true;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // ppid is the field after the `(comm)`.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            return false;
        };
        pid = ppid;
    }
    false
}
