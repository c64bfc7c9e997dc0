//! Upstream services, all inside the `up` namespace: one self-signed certificate, the trusted
//! and the rogue dnsmasq, nginx (HTTPS and HTTP on the shared web IP) and PostgreSQL (ssl on).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::addr;
use crate::daemon::{wait_until, Daemon};
use crate::error::{LabError, Result};
use crate::netns::{host, Netns};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The newest PostgreSQL server install (`/usr/lib/postgresql/<major>/bin`), or `$PG_BIN`.
fn pg_bin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((major, bin))
        })
        .max();
    newest.map(|(_, bin)| bin).ok_or_else(|| {
        LabError::new("no PostgreSQL server in /usr/lib/postgresql/*/bin: run scripts/install-deps or set PG_BIN")
    })
}

/// One self-signed certificate (and CA) for every upstream name; clients trust it via `--cacert`.
#[derive(Debug, Clone)]
pub struct Certs {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let san = format!(
            "subjectAltName=DNS:{},DNS:{},DNS:{},DNS:{},DNS:{},DNS:{},IP:{},IP:{}",
            addr::API,
            addr::API_CNAME,
            addr::EVIL,
            addr::OTHER,
            addr::SHORT,
            addr::DB_NAME,
            addr::WEB,
            addr::DB
        );
        host(&[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "3",
            "-subj",
            "/CN=egressgate-lab",
            "-addext",
            &san,
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&cert)?,
        ])?;
        Ok(Self { cert, key })
    }
}

/// Starts the trusted dnsmasq on [`addr::TRUSTED_DNS`] and waits until it answers.
pub fn start_trusted_dns(up: &Netns, dir: &Path) -> Result<Daemon> {
    let log = dir.join("dnsmasq-trusted.log");
    let mut args = dnsmasq_common(dir, "trusted", addr::TRUSTED_DNS, &log)?;
    for arg in [
        "--local=/example.test/".to_owned(),
        "--local=/cluster.local/".to_owned(),
        "--local-ttl=60".to_owned(),
        format!(
            "--host-record={},{},{},60",
            addr::API_CNAME,
            addr::WEB,
            addr::WEB6
        ),
        format!("--cname={},{},60", addr::API, addr::API_CNAME),
        format!("--host-record={},{},60", addr::EVIL, addr::WEB),
        format!("--host-record={},{},60", addr::OTHER, addr::WEB),
        format!("--host-record={},{},60", addr::DB_NAME, addr::DB),
        format!(
            "--host-record={},{},{}",
            addr::SHORT,
            addr::WEB,
            addr::SHORT_TTL_SECONDS
        ),
    ] {
        args.push(arg);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::spawn(up.name(), "dnsmasq-trusted", &argv, dir, "TERM")?;
    wait_until("trusted dnsmasq", READY_TIMEOUT, || {
        if let Some(status) = daemon.exited() {
            return Err(LabError::new(format!(
                "exited {status}: {}",
                daemon.output_tail(20)
            )));
        }
        let out = up.run_with(
            &[
                "dig",
                &format!("@{}", addr::TRUSTED_DNS),
                "+short",
                "+time=1",
                "+tries=1",
                addr::EVIL,
            ],
            None,
            Duration::from_secs(3),
        )?;
        Ok(out.success() && out.stdout.trim() == addr::WEB)
    })?;
    Ok(daemon)
}

/// Starts the rogue dnsmasq on [`addr::ROGUE_DNS`]: it answers `api.example.test` with
/// [`addr::ROGUE_ANSWER`] and logs every query to `rogue_log`. Readiness is checked with `ss`,
/// not with a query, so its log holds only queries that reached it from a pod.
pub fn start_rogue_dns(up: &Netns, dir: &Path, rogue_log: &Path) -> Result<Daemon> {
    let mut args = dnsmasq_common(dir, "rogue", addr::ROGUE_DNS, rogue_log)?;
    args.push(format!("--address=/{}/{}", addr::API, addr::ROGUE_ANSWER));
    args.push("--local=/example.test/".to_owned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::spawn(up.name(), "dnsmasq-rogue", &argv, dir, "TERM")?;
    let want = format!("{}:53", addr::ROGUE_DNS);
    wait_until("rogue dnsmasq", READY_TIMEOUT, || {
        if let Some(status) = daemon.exited() {
            return Err(LabError::new(format!(
                "exited {status}: {}",
                daemon.output_tail(20)
            )));
        }
        let udp = up.run_with(&["ss", "-Hlun"], None, Duration::from_secs(3))?;
        let tcp = up.run_with(&["ss", "-Hltn"], None, Duration::from_secs(3))?;
        Ok(udp.stdout.contains(&want) && tcp.stdout.contains(&want))
    })?;
    Ok(daemon)
}

fn dnsmasq_common(dir: &Path, tag: &str, listen: &str, log: &Path) -> Result<Vec<String>> {
    Ok(vec![
        "dnsmasq".to_owned(),
        "--no-daemon".to_owned(),
        "--conf-file=/dev/null".to_owned(),
        "--no-resolv".to_owned(),
        "--no-hosts".to_owned(),
        "--bind-interfaces".to_owned(),
        format!("--listen-address={listen}"),
        "--port=53".to_owned(),
        "--user=root".to_owned(),
        format!(
            "--pid-file={}",
            path_str(&dir.join(format!("dnsmasq-{tag}.pid")))?
        ),
        "--log-queries".to_owned(),
        format!("--log-facility={}", path_str(log)?),
    ])
}

/// Starts nginx on [`addr::WEB`] / [`addr::WEB6`], ports 443 (TLS) and 80, one server per name
/// answering `hello from <name>`, and a default server answering `hello from default`.
pub fn start_web(up: &Netns, dir: &Path, certs: &Certs) -> Result<Daemon> {
    let root = dir.join("nginx");
    std::fs::create_dir_all(root.join("tmp"))?;
    let r = path_str(&root)?;
    let listens = |default: &str| {
        format!(
            "    listen {web}:80{default};\n    listen [{web6}]:80{default};\n    \
             listen {web}:443 ssl{default};\n    listen [{web6}]:443 ssl{default};\n",
            web = addr::WEB,
            web6 = addr::WEB6,
        )
    };
    let mut servers = format!(
        "  server {{\n{}    server_name _;\n    return 200 \"hello from default\\n\";\n  }}\n",
        listens(" default_server")
    );
    for name in [addr::API, addr::EVIL, addr::OTHER, addr::SHORT] {
        servers.push_str(&format!(
            "  server {{\n{}    server_name {name};\n    return 200 \"hello from {name}\\n\";\n  }}\n",
            listens("")
        ));
    }
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {r}/nginx.pid;\n\
         error_log {r}/error.log info;\nevents {{ worker_connections 256; }}\nhttp {{\n  \
         access_log {r}/access.log;\n  client_body_temp_path {r}/tmp/body;\n  \
         proxy_temp_path {r}/tmp/proxy;\n  fastcgi_temp_path {r}/tmp/fastcgi;\n  \
         uwsgi_temp_path {r}/tmp/uwsgi;\n  scgi_temp_path {r}/tmp/scgi;\n  \
         default_type text/plain;\n  ssl_certificate {cert};\n  ssl_certificate_key {key};\n\
         {servers}}}\n",
        cert = path_str(&certs.cert)?,
        key = path_str(&certs.key)?,
    );
    let conf_path = root.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let error_log = root.join("error.log");
    let mut daemon = Daemon::spawn(
        up.name(),
        "nginx",
        &[
            "nginx",
            "-p",
            r,
            "-e",
            path_str(&error_log)?,
            "-c",
            path_str(&conf_path)?,
        ],
        dir,
        "TERM",
    )?;
    let url = format!("https://{}/", addr::WEB);
    wait_until("nginx", READY_TIMEOUT, || {
        if let Some(status) = daemon.exited() {
            let log = std::fs::read_to_string(&error_log).unwrap_or_default();
            return Err(LabError::new(format!(
                "exited {status}: {}\n{log}",
                daemon.output_tail(20)
            )));
        }
        let out = up.run_with(
            &["curl", "-sk", "--max-time", "2", &url],
            None,
            Duration::from_secs(4),
        )?;
        Ok(out.success() && out.stdout.contains("hello from default"))
    })?;
    Ok(daemon)
}

/// PostgreSQL 15 on [`addr::DB`]:5432, ssl on with the lab certificate, databases `orders` and
/// `other`, roles `app` and `intruder`, every host trusted.
#[derive(Debug)]
pub struct Postgres {
    daemon: Daemon,
    data: PathBuf,
}

impl Postgres {
    pub fn start(up: &Netns, dir: &Path, certs: &Certs) -> Result<Self> {
        let root = dir.join("pg");
        let data = root.join("data");
        let sock = root.join("sock");
        std::fs::create_dir_all(&sock)?;
        host(&["chown", "-R", "postgres:postgres", path_str(&root)?])?;
        let bin = pg_bin()?;
        let initdb = bin.join("initdb");
        let initdb = path_str(&initdb)?;
        up.exec_ok(&[
            "runuser",
            "-u",
            "postgres",
            "--",
            initdb,
            "-D",
            path_str(&data)?,
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ])?;
        let crt = data.join("server.crt");
        let key = data.join("server.key");
        std::fs::copy(&certs.cert, &crt)?;
        std::fs::copy(&certs.key, &key)?;
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf"))?;
        conf.push_str(&format!(
            "\n# egressgate-lab\nlisten_addresses = '{db}'\nport = 5432\n\
             unix_socket_directories = '{sock}'\nssl = on\nssl_cert_file = '{crt}'\n\
             ssl_key_file = '{key}'\nfsync = off\nsynchronous_commit = off\n\
             shared_buffers = 16MB\nmax_connections = 30\nlog_connections = on\n",
            db = addr::DB,
            sock = path_str(&sock)?,
            crt = path_str(&crt)?,
            key = path_str(&key)?,
        ));
        std::fs::write(data.join("postgresql.conf"), conf)?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 0.0.0.0/0 trust\n\
             host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n",
        )?;
        host(&["chown", "-R", "postgres:postgres", path_str(&root)?])?;
        host(&["chmod", "600", path_str(&key)?])?;
        let postgres = bin.join("postgres");
        let postgres = path_str(&postgres)?;
        let daemon = Daemon::spawn(
            up.name(),
            "postgres",
            &[
                "runuser",
                "-u",
                "postgres",
                "--",
                postgres,
                "-D",
                path_str(&data)?,
            ],
            dir,
            "INT",
        )?;
        let mut pg = Self { daemon, data };
        let isready = bin.join("pg_isready");
        let isready = path_str(&isready)?.to_owned();
        wait_until("postgres", Duration::from_secs(30), || {
            if let Some(status) = pg.daemon.exited() {
                return Err(LabError::new(format!(
                    "exited {status}: {}",
                    pg.daemon.output_tail(30)
                )));
            }
            let out = up.run_with(
                &[&isready, "-h", addr::DB, "-p", "5432", "-t", "1"],
                None,
                Duration::from_secs(3),
            )?;
            Ok(out.success())
        })?;
        up.exec_ok(&[
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-h",
            path_str(&sock)?,
            "-U",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            "CREATE ROLE app LOGIN",
            "-c",
            "CREATE ROLE intruder LOGIN",
            "-c",
            "CREATE DATABASE orders OWNER app",
            "-c",
            "CREATE DATABASE other OWNER app",
        ])?;
        Ok(pg)
    }

    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }

    /// Fast shutdown (SIGINT to the postmaster) and wait for `postmaster.pid` to go, so no
    /// shared memory is left behind; the daemon's group kill is the fallback.
    pub fn stop(&mut self) {
        let pid_file = self.data.join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.lines().next().map(str::trim).map(str::to_owned));
        if let Some(pid) = pid {
            if host(&["kill", "-s", "INT", &pid]).is_ok() {
                let _ = wait_until("postgres shutdown", Duration::from_secs(10), || {
                    Ok(!pid_file.exists())
                });
            }
        }
        self.daemon.stop();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| LabError::new(format!("non-UTF-8 path {}", path.display())))
}
