//! A real Kubernetes API server for the `kube_api` tier, envtest-style: etcd and kube-apiserver
//! (built by `scripts/kube-tools`, cached by version) on the loopback of the lab's node
//! namespace, where the gateway runs, with a generated CA, client-certificate admin, service
//! account keys and RBAC. No kubelet and no controllers: the tests create ServiceAccounts
//! themselves, delete pods with grace period 0, and set pod addresses through the status
//! subresource.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::daemon::{wait_until, Daemon};
use crate::error::{LabError, Result};
use crate::netns::{host, run_in, Netns, Output, CLIENT_TIMEOUT};
use crate::services::path_str;

/// Where kube-apiserver listens, inside the node namespace.
pub const API_PORT: u16 = 6443;
const ETCD_URL: &str = "http://127.0.0.1:2379";
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The node the lab's pods are bound to (`spec.nodeName`), and the gateway watches.
pub const NODE_NAME: &str = "lab-node";

/// The directory with `kube-apiserver` and `etcd`: `$EGRESSGATE_KUBE_TOOLS`, else what
/// `scripts/kube-tools` prints (building it on first use).
pub fn tools_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("EGRESSGATE_KUBE_TOOLS") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube-tools");
    let out = std::process::Command::new(&script).output()?;
    if !out.status.success() {
        return Err(LabError::new(format!(
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// etcd and kube-apiserver in one namespace.
#[derive(Debug)]
pub struct KubeApi {
    ns: String,
    dir: PathBuf,
    tools: PathBuf,
    etcd: Option<Daemon>,
    apiserver: Option<Daemon>,
    admin: PathBuf,
    starts: usize,
}

impl KubeApi {
    /// Starts etcd and the API server in `node` (files under `dir`) and waits until the API
    /// answers `/readyz`.
    pub fn start(node: &Netns, dir: &Path) -> Result<Self> {
        let tools = tools_dir()?;
        let dir = dir.join("kube");
        std::fs::create_dir_all(&dir)?;
        generate_certs(&dir)?;
        let mut api = KubeApi {
            ns: node.name().to_owned(),
            admin: dir.join("admin.kubeconfig"),
            dir,
            tools,
            etcd: None,
            apiserver: None,
            starts: 0,
        };
        std::fs::write(
            &api.admin,
            kubeconfig(
                &api.dir.join("ca.crt"),
                &format!(
                    "    client-certificate: {}\n    client-key: {}\n",
                    api.dir.join("admin.crt").display(),
                    api.dir.join("admin.key").display()
                ),
            ),
        )?;
        api.start_etcd()?;
        api.start_apiserver()?;
        Ok(api)
    }

    fn start_etcd(&mut self) -> Result<()> {
        let etcd = self.tools.join("etcd");
        let data = self.dir.join("etcd-data");
        let daemon = Daemon::spawn(
            &self.ns,
            "etcd",
            &[
                path_str(&etcd)?,
                "--data-dir",
                path_str(&data)?,
                "--listen-client-urls",
                ETCD_URL,
                "--advertise-client-urls",
                ETCD_URL,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "default=http://127.0.0.1:2380",
                "--unsafe-no-fsync",
            ],
            &self.dir,
            "TERM",
        )?;
        self.etcd = Some(daemon);
        wait_until("etcd answers", START_TIMEOUT, || {
            Ok(self
                .in_node(&[
                    "curl",
                    "-s",
                    "--max-time",
                    "2",
                    &format!("{ETCD_URL}/health"),
                ])
                .stdout
                .contains("true"))
        })
    }

    /// Starts (or restarts, after [`KubeApi::stop_apiserver`]) the API server.
    pub fn start_apiserver(&mut self) -> Result<()> {
        let bin = self.tools.join("kube-apiserver");
        let file = |name: &str| self.dir.join(name).display().to_string();
        let args: Vec<String> = vec![
            bin.display().to_string(),
            format!("--etcd-servers={ETCD_URL}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={API_PORT}"),
            format!("--cert-dir={}", file("apiserver-certs")),
            format!("--tls-cert-file={}", file("apiserver.crt")),
            format!("--tls-private-key-file={}", file("apiserver.key")),
            format!("--client-ca-file={}", file("ca.crt")),
            "--service-account-issuer=https://kubernetes.default.svc".to_owned(),
            format!("--service-account-key-file={}", file("sa.pub")),
            format!("--service-account-signing-key-file={}", file("sa.key")),
            "--authorization-mode=RBAC".to_owned(),
            // Never routed: the lab has no Services; the flag is required.
            "--service-cluster-ip-range=198.19.128.0/24".to_owned(),
            "--enable-priority-and-fairness=false".to_owned(),
            "--watch-cache=true".to_owned(),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        self.starts += 1;
        let daemon = Daemon::spawn(
            &self.ns,
            &format!("kube-apiserver-{}", self.starts),
            &argv,
            &self.dir,
            "TERM",
        )?;
        self.apiserver = Some(daemon);
        wait_until("kube-apiserver ready", START_TIMEOUT, || {
            Ok(self.kubectl(&["get", "--raw", "/readyz"]).stdout.trim() == "ok")
        })
        .map_err(|e| {
            let tail = self
                .apiserver
                .as_ref()
                .map(|d| d.output_tail(30))
                .unwrap_or_default();
            LabError::new(format!("{e}\n{tail}"))
        })
    }

    /// Stops the API server (etcd keeps the data).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut daemon) = self.apiserver.take() {
            daemon.stop();
        }
    }

    /// `kubectl` as cluster admin, inside the node namespace.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        let admin = self.admin.display().to_string();
        let mut argv = vec!["kubectl", "--kubeconfig", &admin, "--request-timeout=10s"];
        argv.extend_from_slice(args);
        self.in_node(&argv)
    }

    /// [`KubeApi::kubectl`], failing on a non-zero exit.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args);
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(LabError::new(format!("kubectl failed:\n{out}")))
        }
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let admin = self.admin.display().to_string();
        let out = run_in(
            &self.ns,
            &["kubectl", "--kubeconfig", &admin, "apply", "-f", "-"],
            Some(yaml.as_bytes()),
            CLIENT_TIMEOUT,
        )?;
        if out.success() {
            Ok(())
        } else {
            Err(LabError::new(format!(
                "kubectl apply failed:\n{out}\n{yaml}"
            )))
        }
    }

    /// A kubeconfig that authenticates with `token` (e.g. from [`KubeApi::token`]).
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &path,
            kubeconfig(&self.dir.join("ca.crt"), &format!("    token: {token}\n")),
        )?;
        Ok(path)
    }

    /// A token for ServiceAccount `namespace/name` from the TokenRequest API.
    pub fn token(&self, namespace: &str, name: &str) -> Result<String> {
        Ok(self
            .kubectl_ok(&["create", "token", "-n", namespace, name, "--duration=1h"])?
            .trim()
            .to_owned())
    }

    /// The current etcd revision, and a compaction up to it: watches resumed from an older
    /// resourceVersion then get `410 Gone`.
    pub fn compact_etcd(&self) -> Result<u64> {
        let range = self.in_node(&[
            "curl",
            "-s",
            "--max-time",
            "5",
            "-X",
            "POST",
            &format!("{ETCD_URL}/v3/kv/range"),
            "-d",
            r#"{"key":"AA=="}"#,
        ]);
        let json: serde_json::Value = serde_json::from_str(&range.stdout)
            .map_err(|e| LabError::new(format!("etcd range: {e}: {range}")))?;
        let revision: u64 = json["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| LabError::new(format!("no revision in {json}")))?;
        let body = format!(r#"{{"revision":"{revision}","physical":true}}"#);
        let out = self.in_node(&[
            "curl",
            "-s",
            "--max-time",
            "10",
            "-X",
            "POST",
            &format!("{ETCD_URL}/v3/kv/compaction"),
            "-d",
            &body,
        ]);
        if out.stdout.contains("error") {
            return Err(LabError::new(format!("etcd compaction: {out}")));
        }
        Ok(revision)
    }

    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin
    }

    /// The API server's output, for failure messages.
    pub fn output_tail(&self) -> String {
        self.apiserver
            .as_ref()
            .map(|d| d.output_tail(20))
            .unwrap_or_default()
    }

    /// Runs a command in the node namespace; a command that cannot start at all is an
    /// `Output` with no status.
    fn in_node(&self, args: &[&str]) -> Output {
        run_in(&self.ns, args, None, CLIENT_TIMEOUT).unwrap_or_else(|e| Output {
            command: args.join(" "),
            status: None,
            stdout: String::new(),
            stderr: e.to_string(),
        })
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop_apiserver();
        if let Some(mut etcd) = self.etcd.take() {
            etcd.stop();
        }
    }
}

fn kubeconfig(ca: &Path, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://127.0.0.1:{API_PORT}\n    certificate-authority: {}\nusers:\n- name: lab\n  user:\n{user}contexts:\n- name: lab\n  context: {{cluster: lab, user: lab}}\ncurrent-context: lab\n",
        ca.display()
    )
}

/// CA, API server certificate (127.0.0.1), admin client certificate (system:masters) and the
/// service account signing key pair.
fn generate_certs(dir: &Path) -> Result<()> {
    let p = |name: &str| dir.join(name).display().to_string();
    let openssl = |args: &[&str]| host(&[&["openssl"][..], args].concat()).map(drop);
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "3",
        "-subj",
        "/CN=lab-ca",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.crt"),
    ])?;
    for (name, subject, ext) in [
        (
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc",
        ),
        (
            "admin",
            "/O=system:masters/CN=lab-admin",
            "extendedKeyUsage=clientAuth",
        ),
    ] {
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &p(&format!("{name}.key")),
            "-out",
            &p(&format!("{name}.csr")),
        ])?;
        let ext_file = p(&format!("{name}.ext"));
        std::fs::write(&ext_file, format!("{ext}\n"))?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "3",
            "-extfile",
            &ext_file,
            "-out",
            &p(&format!("{name}.crt")),
        ])?;
    }
    openssl(&["genrsa", "-out", &p("sa.key"), "2048"])?;
    openssl(&["rsa", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")])?;
    Ok(())
}

/// The gateway's ServiceAccount and what it may read, as the chart's `rbac.yaml` grants it
/// (the chart itself is installed by the Helm tests).
pub const GATEWAY_RBAC: &str = r#"apiVersion: v1
kind: ServiceAccount
metadata: {name: egressgate, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: egressgate}
rules:
  - apiGroups: [""]
    resources: [pods, namespaces]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: egressgate}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: egressgate}
subjects: [{kind: ServiceAccount, name: egressgate, namespace: kube-system}]
"#;

impl KubeApi {
    /// A namespace with `labels` (`key=value`), and its `default` ServiceAccount (no
    /// controller-manager creates it here).
    pub fn create_namespace(&self, name: &str, labels: &[&str]) -> Result<()> {
        let labels: Vec<String> = labels
            .iter()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| format!("{k}: \"{v}\""))
            .collect();
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{{}}}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: default, namespace: {name}}}\n",
            labels.join(", ")
        ))
    }

    /// A running pod bound to [`NODE_NAME`] with `labels` (`key=value`) and addresses `ips`,
    /// set through the status subresource as a kubelet would.
    pub fn create_pod(
        &self,
        namespace: &str,
        name: &str,
        labels: &[&str],
        ips: &[&str],
    ) -> Result<()> {
        let labels: Vec<String> = labels
            .iter()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| format!("{k}: \"{v}\""))
            .collect();
        self.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
             labels: {{{}}}\nspec:\n  nodeName: {NODE_NAME}\n  \
             containers: [{{name: app, image: registry.invalid/app}}]\n",
            labels.join(", ")
        ))?;
        let pod_ips: Vec<String> = ips.iter().map(|ip| format!(r#"{{"ip":"{ip}"}}"#)).collect();
        let status = format!(
            r#"{{"status":{{"phase":"Running","podIP":"{}","podIPs":[{}],"startTime":"{}"}}}}"#,
            ips.first().copied().unwrap_or_default(),
            pod_ips.join(","),
            rfc3339_utc_now()
        );
        self.kubectl_ok(&[
            "patch",
            "pod",
            name,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ])?;
        Ok(())
    }

    /// Deletes a pod at once (no kubelet would ever confirm a graceful deletion here).
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<()> {
        self.kubectl_ok(&[
            "delete",
            "pod",
            name,
            "-n",
            namespace,
            "--grace-period=0",
            "--force",
        ])?;
        Ok(())
    }

    /// A kubeconfig for the gateway: the `egressgate` ServiceAccount of [`GATEWAY_RBAC`].
    pub fn gateway_kubeconfig(&self) -> Result<PathBuf> {
        self.apply(GATEWAY_RBAC)?;
        let token = self.token("kube-system", "egressgate")?;
        self.kubeconfig_with_token("egressgate", &token)
    }
}

/// Now, as Kubernetes writes times.
fn rfc3339_utc_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
