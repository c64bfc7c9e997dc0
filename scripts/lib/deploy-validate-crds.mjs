// Validates prometheus-operator objects (ServiceMonitor, PrometheusRule, …) against the schemas
// of the npm package @kubernetes-models/prometheus-operator, strictly.
//
//   node deploy-validate-crds.mjs NODE_MODULES_DIR OBJECTS.json
//
// OBJECTS.json is a JSON array of objects. The package ships its JSON schemas compiled to
// validation functions (ajv standalone code). Those check types, enums and required fields but
// let unknown fields through, so a misspelt key (`honorLabel:`) would pass and Prometheus would
// silently ignore it. To be strict, every object is handed to the validator through a Proxy that
// records which properties the validator reads: a compiled validator reads each property its
// schema declares (and enumerates the keys of maps), so a key present in the data that it never
// read, in an object it did inspect, is an unknown field. Objects the validator never looked into
// (schema-less, `x-kubernetes-preserve-unknown-fields`) are not judged.

import { readFileSync } from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [nodeModules, objectsFile] = process.argv.slice(2);
if (!nodeModules || !objectsFile) {
  console.error("usage: deploy-validate-crds.mjs NODE_MODULES_DIR OBJECTS.json");
  process.exit(2);
}

const schemas = path.join(nodeModules, "@kubernetes-models/prometheus-operator/_schemas");
const prefix = { "monitoring.coreos.com/v1": "ComGithubPrometheusOperatorPrometheusOperatorPkgApisMonitoringV1" };

async function validatorFor(apiVersion, kind) {
  const stem = prefix[apiVersion];
  if (!stem) throw new Error(`no schema for apiVersion ${apiVersion}`);
  const file = path.join(schemas, `${stem}${kind}.js`);
  return (await import(pathToFileURL(file).href)).validate;
}

// Wraps `value` so that reads are recorded in `seen` (one record per object).
function track(value, where, seen) {
  if (value === null || typeof value !== "object") return value;
  const record = { where, value, read: new Set(), enumerated: false };
  seen.push(record);
  const children = new Map();
  return new Proxy(value, {
    get(target, key, receiver) {
      if (typeof key === "string") record.read.add(key);
      const child = Reflect.get(target, key, receiver);
      if (typeof key !== "string" || child === null || typeof child !== "object") return child;
      if (!children.has(key)) children.set(key, track(child, `${where}/${key}`, seen));
      return children.get(key);
    },
    ownKeys(target) {
      record.enumerated = true;
      return Reflect.ownKeys(target);
    },
  });
}

function check(validate, object) {
  const seen = [];
  validate(track(object, "", seen));
  const errors = (validate.errors ?? []).map(
    (e) => `${e.instancePath || "/"}: ${e.message ?? e.keyword} ${JSON.stringify(e.params)}`,
  );
  for (const record of seen) {
    if (Array.isArray(record.value) || record.enumerated || record.read.size === 0) continue;
    for (const key of Object.keys(record.value)) {
      if (!record.read.has(key)) errors.push(`${record.where || "/"}: unknown field "${key}"`);
    }
  }
  return errors;
}

// The checker must itself catch what it is for: a misspelt field and a wrong type.
async function selfTest() {
  const validate = await validatorFor("monitoring.coreos.com/v1", "ServiceMonitor");
  const bad = {
    apiVersion: "monitoring.coreos.com/v1",
    kind: "ServiceMonitor",
    metadata: { name: "self-test", labels: { a: "b" } },
    spec: { selector: {}, endpoints: [{ port: "metrics", honorLabel: true, interval: 30 }] },
  };
  const errors = check(validate, bad).join("\n");
  if (!errors.includes('unknown field "honorLabel"') || !errors.includes("interval")) {
    throw new Error(`self-test: the checker missed planted errors; it said:\n${errors}`);
  }
}

await selfTest();
const objects = JSON.parse(readFileSync(objectsFile, "utf8"));
let failed = 0;
for (const object of objects) {
  const name = `${object.kind}/${object.metadata?.name}`;
  let errors;
  try {
    errors = check(await validatorFor(object.apiVersion, object.kind), object);
  } catch (e) {
    errors = [String(e.message ?? e)];
  }
  if (errors.length) {
    failed++;
    console.log(`ERROR ${name}:\n  ${errors.join("\n  ")}`);
  } else {
    console.log(`ok ${name} (${object.apiVersion}, strict)`);
  }
}
process.exit(failed ? 1 : 0);
