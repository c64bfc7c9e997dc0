//! Fixed addresses of the lab. Pods live in 198.18.0.0/16, the upstream in 198.19.0.0/24 and
//! IPv6 in fd00::/8 ULA; nothing here routes outside the lab's namespaces.

/// The node's side of the upstream link; the upstream's default route.
pub const NODE_UP: &str = "198.19.0.1";
/// The upstream's own address on the link.
pub const UP: &str = "198.19.0.2";
/// Trusted DNS (dnsmasq), the cluster DNS in every pod's resolv.conf.
pub const TRUSTED_DNS: &str = "198.19.0.53";
/// A DNS server the gateway does not trust; it would answer `api.example.test` with
/// [`ROGUE_ANSWER`].
pub const ROGUE_DNS: &str = "198.19.0.66";
pub const ROGUE_ANSWER: &str = "198.19.0.99";
/// The shared web IP: nginx for api, evil, other and short.example.test.
pub const WEB: &str = "198.19.0.10";
pub const WEB6: &str = "fd00:99::10";
/// PostgreSQL (ssl on), port 5432.
pub const DB: &str = "198.19.0.20";
pub const NODE_UP6: &str = "fd00:99::1";
pub const UP6: &str = "fd00:99::2";

/// Names served by the trusted DNS and (except db) by nginx.
pub const API: &str = "api.example.test";
pub const API_CNAME: &str = "lb.cdn.example.test";
pub const EVIL: &str = "evil.example.test";
pub const OTHER: &str = "other.example.test";
pub const SHORT: &str = "short.example.test";
pub const DB_NAME: &str = "db.example.test";
/// TTL of [`SHORT`]'s record.
pub const SHORT_TTL_SECONDS: u64 = 1;

/// Pod `index` (0 = "a"): IPv4 address, IPv4 gateway, IPv6 address, IPv6 gateway.
pub fn pod_addrs(index: usize) -> (String, String, String, String) {
    let n = index + 1;
    (
        format!("198.18.{n}.2"),
        format!("198.18.{n}.1"),
        format!("fd00:{n}::2"),
        format!("fd00:{n}::1"),
    )
}
