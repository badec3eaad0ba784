#!/usr/bin/env bash
# Validates the Kubernetes manifests under k8s/ offline, with no cluster:
#  1. every manifest (k8s/**/*.yaml except kustomization.yaml) against the
#     Kubernetes OpenAPI schemas shipped inside kubernetes-validate, in
#     --strict mode (unknown fields are errors), for each version in
#     K8S_VERSIONS. kubernetes-validate only WARNs (exit 0) for a kind or
#     apiVersion it has no schema for -- a typo there would pass silently --
#     so any WARN/ERROR/FATAL line fails this script too;
#  2. kustomization.yaml (not a Kubernetes object, no schema): parses, lists
#     only files that exist, and lists every manifest in k8s/ (examples/ is
#     deliberately not listed);
#  3. a few cross-object checks the schemas cannot express (selectors match
#     pod labels, references to ConfigMaps/Secrets/ServiceAccounts resolve,
#     hostNetwork hostPort == containerPort, Bidirectional => privileged).
# A self-test first makes sure strict mode really rejects an unknown field.
# Needs kubernetes-validate (scripts/setup/tools.sh installs it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K8S_DIR="${K8S_DIR:-$ROOT/k8s}"
# Oldest Kubernetes we support and the newest the installed tool ships
# schemas for (kubernetes-validate 1.37.0: 1.25 .. 1.37).
K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.37.0}"
PY="${PYTHON:-python3}"

if command -v kubernetes-validate >/dev/null 2>&1; then
    KV=(kubernetes-validate)
elif "$PY" -c 'import kubernetes_validate' >/dev/null 2>&1; then
    KV=("$PY" -m kubernetes_validate)
else
    echo "check-k8s: kubernetes-validate not installed (run scripts/setup/tools.sh)" >&2
    exit 2
fi
KV_ARGS=(--strict)
for v in $K8S_VERSIONS; do KV_ARGS+=(-k "$v"); done

fail=0

# --- self-test: strict mode must reject an unknown field -------------------
selftest='apiVersion: v1
kind: ConfigMap
metadata:
  name: selftest
  bogusField: 1
'
if printf '%s' "$selftest" | "${KV[@]}" "${KV_ARGS[@]}" --quiet - >/dev/null 2>&1; then
    echo "check-k8s: FAIL self-test: kubernetes-validate accepted an unknown field" >&2
    exit 2
fi

# --- 1. schema validation ------------------------------------------------------
mapfile -t manifests < <(find "$K8S_DIR" -type f \( -name '*.yaml' -o -name '*.yml' \) \
    ! -name kustomization.yaml ! -name kustomization.yml | sort)
if [ "${#manifests[@]}" -eq 0 ]; then
    echo "check-k8s: no manifests found under $K8S_DIR" >&2
    exit 1
fi
for f in "${manifests[@]}"; do
    rel="${f#"$ROOT"/}"
    set +e
    out="$("${KV[@]}" "${KV_ARGS[@]}" --quiet "$f" 2>&1)"
    rc=$?
    set -e
    if [ "$rc" -ne 0 ] || printf '%s\n' "$out" | grep -Eq '^(WARN|ERROR|FATAL)'; then
        echo "FAIL $rel"
        printf '%s\n' "$out" | sed 's/^/    /'
        fail=1
    else
        echo "ok   $rel (strict, k8s $K8S_VERSIONS)"
    fi
done

# --- 2 + 3. kustomization and cross-object checks -----------------------------
if ! "$PY" - "$K8S_DIR" <<'PYEOF'
import os, sys, glob
import yaml

k8s = sys.argv[1]
errors = []

def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]

# kustomization.yaml
kpath = os.path.join(k8s, "kustomization.yaml")
listed = []
if not os.path.exists(kpath):
    errors.append("k8s/kustomization.yaml is missing")
else:
    docs = load(kpath)
    if len(docs) != 1 or docs[0].get("kind") != "Kustomization" \
            or not str(docs[0].get("apiVersion", "")).startswith("kustomize.config.k8s.io/"):
        errors.append("kustomization.yaml: expected one kustomize.config.k8s.io Kustomization")
    else:
        listed = docs[0].get("resources") or []
        if len(set(listed)) != len(listed):
            errors.append("kustomization.yaml: duplicate entries in resources")
        for r in listed:
            if not os.path.isfile(os.path.join(k8s, r)):
                errors.append(f"kustomization.yaml lists {r}, which does not exist")
top = sorted(os.path.basename(p) for p in glob.glob(os.path.join(k8s, "*.y*ml"))
             if os.path.basename(p) not in ("kustomization.yaml", "kustomization.yml"))
for name in top:
    if name not in listed:
        errors.append(f"k8s/{name} is not listed in kustomization.yaml")

# Objects that get applied (the kustomization's resources) plus examples,
# which stand in for objects created out of band (the database Secret).
objs = []
for r in listed:
    p = os.path.join(k8s, r)
    if os.path.isfile(p):
        objs += [(r, d) for d in load(p)]
examples = []
for p in sorted(glob.glob(os.path.join(k8s, "examples", "*.y*ml"))):
    examples += [(os.path.relpath(p, k8s), d) for d in load(p)]

def key(d):
    md = d.get("metadata", {})
    return (d.get("kind"), md.get("namespace"), md.get("name"))

seen = {}
for src, d in objs:
    k = key(d)
    if k in seen:
        errors.append(f"{src}: {k} already defined in {seen[k]}")
    seen[k] = src
known = {key(d) for _, d in objs + examples}
namespaces = {d["metadata"]["name"] for _, d in objs if d.get("kind") == "Namespace"}

pod_templates = []  # (src, namespace, labels, podspec)
for src, d in objs:
    md = d.get("metadata", {})
    ns = md.get("namespace")
    if d.get("kind") != "Namespace" and ns not in namespaces:
        errors.append(f"{src}: {key(d)} is in namespace {ns!r}, which no manifest creates")
    if d.get("kind") in ("Deployment", "DaemonSet", "StatefulSet"):
        spec = d["spec"]
        labels = spec["template"]["metadata"].get("labels", {})
        sel = spec["selector"].get("matchLabels", {})
        if any(labels.get(k) != v for k, v in sel.items()):
            errors.append(f"{src}: selector {sel} does not match template labels {labels}")
        pod_templates.append((src, ns, labels, spec["template"]["spec"]))

for src, ns, labels, pod in pod_templates:
    sa = pod.get("serviceAccountName")
    if sa and ("ServiceAccount", ns, sa) not in known:
        errors.append(f"{src}: ServiceAccount {sa} is not defined")
    host_net = pod.get("hostNetwork", False)
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        cname = c["name"]
        privileged = (c.get("securityContext") or {}).get("privileged", False)
        for ef in c.get("envFrom", []):
            if "configMapRef" in ef and ("ConfigMap", ns, ef["configMapRef"]["name"]) not in known:
                errors.append(f"{src}/{cname}: ConfigMap {ef['configMapRef']['name']} is not defined")
            if "secretRef" in ef and ("Secret", ns, ef["secretRef"]["name"]) not in known:
                errors.append(f"{src}/{cname}: Secret {ef['secretRef']['name']} is not defined")
        for e in c.get("env", []):
            vf = e.get("valueFrom") or {}
            for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if field in vf:
                    name, k = vf[field]["name"], vf[field]["key"]
                    found = [d for _, d in objs + examples if key(d) == (kind, ns, name)]
                    if not found:
                        errors.append(f"{src}/{cname}: {kind} {name} (not even as an example)")
                    elif not any(k in (d.get("data") or {}) or k in (d.get("stringData") or {})
                                 for d in found):
                        errors.append(f"{src}/{cname}: {kind} {name} has no key {k}")
        for p in c.get("ports", []):
            if host_net and p.get("hostPort", p["containerPort"]) != p["containerPort"]:
                errors.append(f"{src}/{cname}: with hostNetwork, hostPort must equal containerPort")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                errors.append(f"{src}/{cname}: volumeMount {m['name']} has no volume")
            if m.get("mountPropagation") == "Bidirectional" and not privileged:
                errors.append(f"{src}/{cname}: Bidirectional propagation needs privileged")
        ports = {p["containerPort"] for p in c.get("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            g = (c.get(probe) or {}).get("grpc")
            if g and g["port"] not in ports:
                errors.append(f"{src}/{cname}: {probe} grpc port {g['port']} is not a container port")

for src, d in objs:
    if d.get("kind") == "Service" and d["spec"].get("selector"):
        ns, sel = d["metadata"].get("namespace"), d["spec"]["selector"]
        if not any(tns == ns and all(l.get(k) == v for k, v in sel.items())
                   for _, tns, l, _ in pod_templates):
            errors.append(f"{src}: Service selector {sel} matches no pod template")

for e in errors:
    print(f"FAIL {e}")
if not errors:
    print(f"ok   kustomization.yaml lists all {len(listed)} manifests; cross-object checks passed")
sys.exit(1 if errors else 0)
PYEOF
then
    fail=1
fi

if [ "$fail" -ne 0 ]; then
    echo "check-k8s: FAILED" >&2
    exit 1
fi
echo "check-k8s: all manifests valid"
