#!/usr/bin/env python3
"""Helpers for scripts/check-deploy: checks on the Helm chart's rendered output and its docs.

Subcommands (each exits non-zero with a message on failure):
  split RENDERED OUTDIR            core kinds -> OUTDIR/core.yaml, CRD kinds -> OUTDIR/crds.json
  assert SET RENDERED              the chart's requirements, plus what value set SET must render
  extract-config RENDERED OUTDIR   config.yaml and policy files, with policyDir pointing to OUTDIR
  rules RENDERED                   print the PrometheusRule's groups as a Prometheus rules file
  values-doc check|sync CHART      README values table and values.schema.json cover values.yaml
  dockerfile CARGO_TOML DOCKERFILE the image copies every workspace member and runs what the chart runs

Needs PyYAML (the kubernetes-validate venv has it).
"""

import hashlib
import json
import re
import sys
from pathlib import Path

import yaml

CRD_GROUPS = ("monitoring.coreos.com/",)
ADMIN_DEFAULT_PORT = 15090


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def load_docs(path):
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    if not docs:
        fail(f"{path}: nothing rendered")
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def one(docs, kind):
    found = by_kind(docs, kind)
    if len(found) != 1:
        fail(f"expected exactly one {kind}, got {len(found)}")
    return found[0]


# --- split -------------------------------------------------------------------------------------

def cmd_split(rendered, outdir):
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    docs = load_docs(rendered)
    core = [d for d in docs if not d["apiVersion"].startswith(CRD_GROUPS)]
    crds = [d for d in docs if d["apiVersion"].startswith(CRD_GROUPS)]
    (out / "core.yaml").write_text(yaml.safe_dump_all(core, sort_keys=False))
    (out / "crds.json").write_text(json.dumps(crds, indent=1))
    print(f"{len(core)} core objects, {len(crds)} prometheus-operator objects")


# --- assert ------------------------------------------------------------------------------------

# What each value set in deploy/helm/ci renders: kind -> count.
RBAC = {"ServiceAccount": 1, "ClusterRole": 1, "ClusterRoleBinding": 1, "Role": 1,
        "RoleBinding": 1}
EXPECTED_KINDS = {
    "defaults": {**RBAC, "ConfigMap": 3, "Service": 1, "DaemonSet": 1},
    "full": {**RBAC, "ConfigMap": 3, "Service": 1, "DaemonSet": 1, "ServiceMonitor": 1,
             "PrometheusRule": 1},
    "existing-configmaps": {**RBAC, "Service": 1, "DaemonSet": 1},
    "monitoring-without-api": {**RBAC, "ConfigMap": 3, "Service": 1, "DaemonSet": 1},
    "monitoring-assumed": {**RBAC, "ConfigMap": 3, "Service": 1, "DaemonSet": 1,
                           "ServiceMonitor": 1, "PrometheusRule": 1},
}


def expect(condition, message):
    if not condition:
        fail(message)


def config_map_named(docs, suffix):
    found = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith(suffix)]
    return found[0] if found else None


def check_daemonset(ds, admin_port, defaults):
    spec = ds["spec"]
    pod = spec["template"]["spec"]
    expect(pod.get("hostNetwork") is True, "DaemonSet: hostNetwork must be true")
    expect(pod.get("dnsPolicy") == "ClusterFirstWithHostNet",
           "DaemonSet: dnsPolicy must be ClusterFirstWithHostNet")
    containers = pod["containers"]
    expect(len(containers) == 1, "DaemonSet: one container")
    c = containers[0]
    expect(c["args"] == ["run", "--config", "/etc/egressgate/config.yaml"],
           f"container args: {c['args']}")
    sc = c["securityContext"]
    expect(sc["capabilities"]["drop"] == ["ALL"], "capabilities: drop ALL")
    expect(sorted(sc["capabilities"]["add"]) == ["NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW"],
           "capabilities: add exactly NET_ADMIN, NET_RAW, NET_BIND_SERVICE, got "
           f"{sc['capabilities']['add']}")
    expect(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
    expect(sc.get("privileged") is False, "privileged must be false")
    expect(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
    # hostNetwork makes container ports host ports: a declared port blocks the surge pod.
    expect(not c.get("ports"), "the container must declare no ports (host ports block maxSurge)")
    env = {e["name"]: e for e in c["env"]}
    expect(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
           == "spec.nodeName", "NODE_NAME must come from the downward API (spec.nodeName)")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        expect(get["path"] == path and get["port"] == admin_port,
               f"{probe}: expected GET {path} on {admin_port}, got {get}")
    res = c["resources"]
    expect(res.get("requests") and res.get("limits"), "resources: requests and limits")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cfg = mounts.get("/etc/egressgate/config.yaml")
    expect(cfg and cfg.get("subPath") == "config.yaml", "config.yaml mounted at /etc/egressgate")
    pol = mounts.get("/etc/egressgate/policies")
    expect(pol and "subPath" not in pol,
           "policies mounted as a directory (no subPath, or ConfigMap updates never arrive)")
    state = mounts.get("/var/lib/egressgate")
    expect(state and "hostPath" in volumes[state["name"]], "hostPath state dir at /var/lib/egressgate")
    expect(pod.get("serviceAccountName"), "serviceAccountName")
    if defaults:
        expect(pod.get("priorityClassName") == "system-node-critical",
               "priorityClassName system-node-critical")
        expect({"operator": "Exists"} in pod.get("tolerations", []),
               "tolerations: operator Exists (run on every node)")
        expect(spec["updateStrategy"] == {"type": "RollingUpdate",
                                          "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
               f"updateStrategy: {spec['updateStrategy']}")
    return pod, volumes


def cmd_assert(value_set, rendered):
    docs = load_docs(rendered)
    kinds = {}
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    want = EXPECTED_KINDS.get(value_set)
    expect(want is not None, f"no expectations for value set {value_set!r}")
    expect(kinds == want, f"{value_set}: rendered kinds {kinds}, expected {want}")

    # RBAC: read pods and namespaces, nothing more.
    role = one(docs, "ClusterRole")
    expect(role["rules"] == [{"apiGroups": [""], "resources": ["pods", "namespaces"],
                              "verbs": ["get", "list", "watch"]}],
           f"ClusterRole rules: {role['rules']}")
    binding = one(docs, "ClusterRoleBinding")
    sa = one(docs, "ServiceAccount")
    expect(binding["roleRef"]["name"] == role["metadata"]["name"], "binding names the role")
    expect(binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}],
           "binding subject is the ServiceAccount")

    ds = one(docs, "DaemonSet")
    # The gateway watches its own DaemonSet and reads it at exit (gone: uninstalled, remove the
    # rules): that one object only.
    own_role = one(docs, "Role")
    expect(own_role["rules"] == [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                                  "resourceNames": [ds["metadata"]["name"]],
                                  "verbs": ["get", "list", "watch"]}],
           f"Role rules: {own_role['rules']}")
    own_binding = one(docs, "RoleBinding")
    expect(own_binding["roleRef"]["name"] == own_role["metadata"]["name"]
           and own_binding["subjects"] == binding["subjects"], "RoleBinding")
    config_cm = config_map_named(docs, "-config")
    admin_port = ADMIN_DEFAULT_PORT
    if config_cm:
        text = config_cm["data"]["config.yaml"]
        config = yaml.safe_load(text)
        expect(config["identity"] == {"kubernetes": {}}, f"identity: {config['identity']}")
        expect(config["policyDir"] == "/etc/egressgate/policies", "policyDir")
        owner = {"namespace": ds["metadata"]["namespace"], "name": ds["metadata"]["name"]}
        expect(config["nftables"].get("ownerDaemonSet") == owner,
               f"nftables.ownerDaemonSet: {config['nftables'].get('ownerDaemonSet')}")
        for section, key in (("dns", "maxNames"), ("dns", "maxNamesPerPod"), ("nftables", "mark"),
                             ("peek", "maxBytes"), ("dns", "upstreamTimeoutMs")):
            value = config[section][key]
            expect(isinstance(value, int) and not isinstance(value, bool),
                   f"config {section}.{key} must render as an integer, got {value!r}")
        admin_port = int(config["listen"]["admin"].rsplit(":", 1)[1])
        checksum = ds["spec"]["template"]["metadata"]["annotations"].get("checksum/config")
        expect(checksum == hashlib.sha256(text.rstrip("\n").encode()).hexdigest(),
               "checksum/config must be the sha256 of the rendered config")
    pod, volumes = check_daemonset(ds, admin_port, defaults=value_set != "full")
    service = one(docs, "Service")
    expect(service["spec"].get("clusterIP") == "None", "metrics Service is headless")
    expect(service["spec"]["selector"].items() <= pod_labels(ds).items(),
           "metrics Service selects the gateway pods")
    expect(service["spec"]["ports"] == [{"name": "metrics", "port": admin_port,
                                         "targetPort": admin_port, "protocol": "TCP"}],
           f"metrics Service ports: {service['spec']['ports']}")

    if value_set == "existing-configmaps":
        expect(volumes["config"]["configMap"]["name"] == "egressgate-config-managed",
               "config volume uses config.existingConfigMap")
        expect(volumes["policies"]["configMap"]["name"] == "egressgate-policies-managed",
               "policies volume uses policies.existingConfigMap")
        expect("checksum/config" not in (ds["spec"]["template"]["metadata"].get("annotations") or {}),
               "no config checksum for an existing ConfigMap")
    else:
        for volume, suffix in (("config", "-config"), ("policies", "-policies")):
            cm = config_map_named(docs, suffix)
            expect(cm and volumes[volume]["configMap"]["name"] == cm["metadata"]["name"],
                   f"{volume} volume uses the chart's ConfigMap")

    if value_set == "full":
        policies = config_map_named(docs, "-policies")["data"]
        expect(sorted(policies) == ["item-00-platform-baseline.yaml", "shop.yaml"],
               f"policy files: {sorted(policies)}")
        expect(pod["containers"][0]["image"].startswith("registry.example.test/platform/egressgate@sha256:"),
               "image digest wins over the tag")

    dashboards = config_map_named(docs, "-dashboards")
    if dashboards:
        expect(dashboards["metadata"]["labels"].get("grafana_dashboard") == "1",
               "dashboards ConfigMap carries grafana_dashboard: \"1\"")
        expect(len(dashboards["data"]) >= 2, "both dashboards are in the ConfigMap")
        size = 0
        for key, text in dashboards["data"].items():
            try:
                json.loads(text)
            except ValueError as e:
                fail(f"dashboard {key} is not JSON: {e}")
            size += len(key) + len(text.encode())
        expect(size < 900 * 1024, f"dashboards ConfigMap is {size} bytes; ConfigMaps hold 1 MiB")

    monitors = by_kind(docs, "ServiceMonitor")
    if monitors:
        sm = monitors[0]["spec"]
        expect(sm["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items(),
               "ServiceMonitor selects the metrics Service")
        endpoint = sm["endpoints"][0]
        expect(endpoint["port"] == "metrics", "ServiceMonitor scrapes the metrics port")
        expect(endpoint.get("honorLabels") is True,
               "ServiceMonitor honorLabels (the gateway's namespace label must win)")
        expect({"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_node_name"],
                "targetLabel": "node"} in endpoint.get("relabelings", []),
               "ServiceMonitor adds the node label")
        expect(sm["jobLabel"] == "app.kubernetes.io/name"
               and service["metadata"]["labels"]["app.kubernetes.io/name"] == "egressgate",
               "job label is the chart name, as the alerts expect")
    rules = by_kind(docs, "PrometheusRule")
    if rules:
        alerts = {r.get("alert") for g in rules[0]["spec"]["groups"] for r in g["rules"]}
        want_alerts = {"EgressgateDown", "EgressgatePolicyStale", "EgressgateDenySpike",
                       "EgressgateDnsUpstreamErrors"}
        expect(want_alerts <= alerts, f"alerts: {alerts}")
    print(f"{value_set}: {sum(kinds.values())} objects, requirements hold")


def pod_labels(ds):
    return ds["spec"]["template"]["metadata"]["labels"]


# --- extract-config ----------------------------------------------------------------------------

def cmd_extract_config(rendered, outdir):
    docs = load_docs(rendered)
    out = Path(outdir)
    (out / "policies").mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(config_map_named(docs, "-config")["data"]["config.yaml"])
    config["policyDir"] = str((out / "policies").resolve())
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    files = config_map_named(docs, "-policies").get("data") or {}
    for name, text in files.items():
        (out / "policies" / name).write_text(text)
    print(f"{out / 'config.yaml'} and {len(files)} policy file(s)")


# --- rules -------------------------------------------------------------------------------------

class LiteralDumper(yaml.SafeDumper):
    pass


def _str(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


LiteralDumper.add_representer(str, _str)

RULES_HEADER = """\
# Generated from the Helm chart's PrometheusRule (deploy/helm/egressgate, default values) by
# `scripts/check-deploy --sync`; do not edit: change the chart and sync.
# For a Prometheus without the operator: scrape every node's gateway (admin port, /metrics) in a
# job named "egressgate", with honor_labels: true and a `node` label naming the node.
"""


def cmd_rules(rendered):
    rules = by_kind(load_docs(rendered), "PrometheusRule")
    expect(len(rules) == 1, "expected one PrometheusRule")
    body = yaml.dump({"groups": rules[0]["spec"]["groups"]}, Dumper=LiteralDumper,
                     sort_keys=False, width=4096)
    sys.stdout.write(RULES_HEADER + body)


# --- values-doc --------------------------------------------------------------------------------

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):(?P<rest>.*)$")
TABLE_START = "<!-- values-table:start (generated from values.yaml by scripts/check-deploy --sync) -->"
TABLE_END = "<!-- values-table:end -->"


def documented_keys(values_text):
    """(path, description) for every key with a `# --` comment, in file order."""
    stack, doc, out = [], None, []
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            doc = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if doc is not None:
                doc.append(stripped[1:].strip())
            continue
        m = KEY_LINE.match(line)
        if not m:
            doc = None
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        if doc is not None:
            out.append((".".join(k for _, k in stack), " ".join(doc)))
        doc = None
    return out


def leaf_paths(value, prefix=""):
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from leaf_paths(child, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def lookup(values, path):
    for key in path.split("."):
        values = values[key]
    return values


def schema_node(schema, root, path):
    """The schema node for a dotted path, or None; True when a free-form object covers it."""
    node = schema
    for key in path.split("."):
        node = resolve(node, root)
        props = node.get("properties", {})
        if key in props:
            node = props[key]
            continue
        extra = node.get("additionalProperties", True)
        if extra is False:
            return None
        return True
    return resolve(node, root)


def resolve(node, root):
    if isinstance(node, dict) and "$ref" in node:
        target = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return resolve(target, root)
    if isinstance(node, dict) and "allOf" in node and "properties" not in node:
        for sub in node["allOf"]:
            sub = resolve(sub, root)
            if "properties" in sub or "additionalProperties" in sub:
                return sub
    return node


def schema_paths(node, root, prefix=""):
    node = resolve(node, root)
    for key, child in node.get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        yield path
        yield from schema_paths(child, root, path)


def type_name(value):
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def values_table(chart):
    values_text = (chart / "values.yaml").read_text()
    values = yaml.safe_load(values_text)
    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for path, description in documented_keys(values_text):
        value = lookup(values, path)
        default = json.dumps(value, separators=(", ", ": "))
        rows.append(f"| `{path}` | {type_name(value)} | `{default}` | "
                    f"{description.replace('|', '&#124;')} |")
    return "\n".join(rows)


def cmd_values_doc(mode, chart):
    chart = Path(chart)
    values_text = (chart / "values.yaml").read_text()
    values = yaml.safe_load(values_text)
    schema = json.loads((chart / "values.schema.json").read_text())
    documented = [p for p, _ in documented_keys(values_text)]
    problems = []
    for path in documented:
        try:
            lookup(values, path)
        except (KeyError, TypeError):
            problems.append(f"values.yaml: documented key {path} is not a value")
    for leaf in leaf_paths(values):
        parts = leaf.split(".")
        if not any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1)):
            problems.append(f"values.yaml: {leaf} has no `# --` description (nor has a parent)")
        if schema_node(schema, schema, leaf) is None:
            problems.append(f"values.schema.json: no schema for {leaf}")
    for path in schema_paths(schema, schema):
        if path == "global":
            continue
        try:
            lookup(values, path)
        except (KeyError, TypeError):
            problems.append(f"values.schema.json: {path} is not in values.yaml")
    readme = chart / "README.md"
    text = readme.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        problems.append(f"{readme}: no values table markers")
    else:
        head, rest = text.split(TABLE_START, 1)
        _, tail = rest.split(TABLE_END, 1)
        want = f"{head}{TABLE_START}\n{values_table(chart)}\n{TABLE_END}{tail}"
        if want != text:
            if mode == "sync":
                readme.write_text(want)
                print(f"{readme}: values table regenerated")
            else:
                problems.append(f"{readme}: the values table is out of date with values.yaml "
                                "(run scripts/check-deploy --sync)")
    if problems:
        fail("\n  ".join(["values documentation:"] + problems))
    print(f"values.yaml: {len(documented)} documented keys; README table and schema cover "
          f"every value")


# --- dockerfile --------------------------------------------------------------------------------

def cmd_dockerfile(cargo_toml, dockerfile):
    import tomllib

    members = tomllib.loads(Path(cargo_toml).read_text())["workspace"]["members"]
    text = Path(dockerfile).read_text()
    copied = set(re.findall(r"^COPY (\S+) \1$", text, re.M))
    problems = [f"workspace member {m} is not copied (add `COPY {m} {m}`)"
                for m in members if m not in copied]
    problems += [f"`COPY {c} {c}` is not a workspace member" for c in sorted(copied)
                 if c not in members]
    if not re.search(r"^COPY Cargo.toml Cargo.lock ./$", text, re.M):
        problems.append("Cargo.toml and Cargo.lock are not copied")
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    if len(bases) != 2 or not all(b.endswith("bookworm") or b.endswith("bookworm-slim")
                                  for b in bases):
        problems.append(f"builder and runtime must both be Debian bookworm: {bases}")
    for package in ("nftables", "iproute2"):
        if not re.search(rf"apt-get install[^\n]*\b{package}\b", text):
            problems.append(f"the runtime image must install {package}")
    if 'CMD ["run", "--config", "/etc/egressgate/config.yaml"]' not in text:
        problems.append("CMD must be what the chart runs: run --config /etc/egressgate/config.yaml")
    if problems:
        fail("\n  ".join([f"{dockerfile}:"] + problems))
    print(f"{dockerfile}: copies the workspace ({', '.join(members)}), bookworm builder and runtime")


def main(argv):
    commands = {
        "split": (cmd_split, 2),
        "assert": (cmd_assert, 2),
        "extract-config": (cmd_extract_config, 2),
        "rules": (cmd_rules, 1),
        "values-doc": (cmd_values_doc, 2),
        "dockerfile": (cmd_dockerfile, 2),
    }
    if len(argv) < 2 or argv[1] not in commands or len(argv) - 2 != commands[argv[1]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    command, _ = commands[argv[1]]
    command(*argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
