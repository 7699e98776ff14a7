#!/usr/bin/env bash
# Validate the deployment assets under deploy/.
#
#   bash deploy/check.sh            # from anywhere; run as root on a fresh
#                                   # Debian 12 to let it install its tools
#   CYAN_BIN=target/release/cyan bash deploy/check.sh
#                                   # also run `cyan check` on the example configs
#
# Tools it installs with apt-get when missing: prometheus (for promtool; the
# package's own service is kept from starting through policy-rc.d), systemd
# (systemd-analyze), python3-yaml. kubectl is used when present (Debian 12's
# kubernetes-client is too old for this kustomization); without it each YAML
# file is parsed and checked on its own.
#
# Prints one line per check and ends with "deploy-checks: N passed, M failed";
# exits non-zero when any check failed.
set -euo pipefail

DEPLOY=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# CYAN_BIN may be relative to where the script was started.
case "${CYAN_BIN:-}" in
    "" | /*) ;;
    *) CYAN_BIN="$PWD/$CYAN_BIN" ;;
esac
cd "$DEPLOY"

# Exposure limit for the systemd unit, on systemd-analyze's 0-100 scale
# (20 == 2.0).
THRESHOLD=20

WORK=$(mktemp -d)
POLICY_RC_CREATED=0
cleanup() {
    rm -rf "$WORK"
    if [ "$POLICY_RC_CREATED" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); printf 'ok    %s\n' "$1"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL  %s\n' "$1"; }
skip() { printf 'skip  %s\n' "$1"; }
# check NAME COMMAND...: one check; the command's output is shown on failure.
check() {
    local name=$1
    shift
    if "$@" >"$WORK/out" 2>&1; then
        pass "$name"
    else
        fail "$name"
        sed 's/^/      /' "$WORK/out"
    fi
}

# ------------------------------------------------------------------ tools
APT_UPDATED=0
apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "check.sh: need root to install: $*" >&2
        return 1
    fi
    if [ "$APT_UPDATED" = 0 ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v promtool >/dev/null 2>&1; then
    echo "installing prometheus (for promtool)..."
    # Only promtool is wanted: keep the packaged server from being started.
    if [ ! -e /usr/sbin/policy-rc.d ] && [ "$(id -u)" = 0 ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    apt_install prometheus || true
    if [ "$POLICY_RC_CREATED" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=0
    fi
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "installing systemd (for systemd-analyze)..."
    apt_install systemd || true
fi
PY=python3
if ! { command -v "$PY" >/dev/null 2>&1 && "$PY" -c 'import yaml, tomllib' >/dev/null 2>&1; }; then
    echo "installing python3-yaml..."
    apt_install python3 python3-yaml || true
    PY=/usr/bin/python3
fi

# ------------------------------------------------------------------ files
files_present() {
    local missing=0 f
    for f in systemd/cyan.service systemd/cyan@.service docker/Dockerfile docker/cyan.toml \
        k8s/kustomization.yaml k8s/cyan.toml k8s/deployment.yaml k8s/service.yaml k8s/pdb.yaml \
        prometheus/cyan-rules.yml prometheus/cyan-rules.test.yml prometheus/scrape.yml \
        grafana/cyan.json README.md; do
        if [ ! -s "$f" ]; then
            echo "missing or empty: deploy/$f"
            missing=1
        fi
    done
    return "$missing"
}
check "files present" files_present

# ------------------------------------------------------------- prometheus
if command -v promtool >/dev/null 2>&1; then
    check "promtool check rules prometheus/cyan-rules.yml" promtool check rules prometheus/cyan-rules.yml
    check "promtool test rules prometheus/cyan-rules.test.yml" \
        bash -c 'cd prometheus && promtool test rules cyan-rules.test.yml'

    # scrape.yml is a scrape_configs snippet: wrap it in a full config that
    # also loads the rules. Debian's promtool is built without Kubernetes
    # service discovery; if it rejects kubernetes_sd_configs, that job is
    # checked (relabelling included) with a static target instead.
    scrape_config_check() {
        "$PY" - "$WORK" <<'PYEOF'
import subprocess, sys, yaml
work = sys.argv[1]
snippet = yaml.safe_load(open("prometheus/scrape.yml"))
jobs = snippet["scrape_configs"]
assert any(j["job_name"].startswith("cyan") for j in jobs), "no cyan job"
def write(cfg_jobs):
    cfg = {"global": {"scrape_interval": "15s"}, "rule_files": ["cyan-rules.yml"],
           "scrape_configs": cfg_jobs}
    with open(f"{work}/prometheus.yml", "w") as f:
        yaml.safe_dump(cfg, f)
    subprocess.run(["cp", "prometheus/cyan-rules.yml", work], check=True)
    return subprocess.run(["promtool", "check", "config", f"{work}/prometheus.yml"],
                          capture_output=True, text=True)
r = write(jobs)
if r.returncode != 0 and "kubernetes_sd_configs" in r.stdout + r.stderr:
    print("note: this promtool has no kubernetes_sd; checking that job with a static target")
    for j in jobs:
        if j.pop("kubernetes_sd_configs", None) is not None:
            j["static_configs"] = [{"targets": ["127.0.0.1:9900"]}]
    r = write(jobs)
print(r.stdout, r.stderr)
sys.exit(r.returncode)
PYEOF
    }
    check "promtool check config (prometheus/scrape.yml + rules)" scrape_config_check
else
    fail "promtool not available (apt-get install prometheus)"
fi

# ---------------------------------------------------------------- systemd
# cyan.service, and the template cyan@.service (instances cyan@a / cyan@b
# for binary upgrades; systemd-analyze checks the template as cyan@i).
UNITS="systemd/cyan.service systemd/cyan@.service"
if command -v systemd-analyze >/dev/null 2>&1; then
    security_check() {
        local unit=$1 rc=0 score
        systemd-analyze security --offline=true --threshold="$THRESHOLD" "$unit" >"$WORK/security" 2>&1 || rc=$?
        score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' "$WORK/security")
        echo "$score" >"$WORK/score"
        if [ -z "$score" ]; then
            cat "$WORK/security"
            return 1
        fi
        echo "exposure $score (threshold $THRESHOLD/100), systemd-analyze exit $rc"
        grep '✗' "$WORK/security" || true
        # Both the tool's own verdict and the number itself.
        [ "$rc" = 0 ] && awk -v s="$score" -v t="$THRESHOLD" 'BEGIN { exit !(s * 10 <= t) }'
    }
    # Unknown or misspelled directives; the binary itself need not be installed.
    verify_unit() {
        local out
        out=$(systemd-analyze verify "$1" 2>&1 || true)
        out=$(printf '%s\n' "$out" | grep -v -e 'Command /usr/local/bin/cyan is not executable' \
            -e '^$' || true)
        if [ -n "$out" ]; then
            printf '%s\n' "$out"
            return 1
        fi
    }
    for UNIT in $UNITS; do
        if security_check "$UNIT" >"$WORK/sec.out" 2>&1; then
            pass "systemd-analyze security --offline=true --threshold=$THRESHOLD $UNIT: exposure $(cat "$WORK/score")"
        else
            fail "systemd-analyze security --offline=true --threshold=$THRESHOLD $UNIT: exposure $(cat "$WORK/score" 2>/dev/null || echo '?')"
            sed 's/^/      /' "$WORK/sec.out"
        fi
        check "systemd-analyze verify $UNIT" verify_unit "$UNIT"
    done
else
    fail "systemd-analyze not available (apt-get install systemd)"
fi

# unit_directives UNIT DIRECTIVE...: each given line is in the unit (a
# directive ending in '=' only needs a number after it).
unit_directives() {
    local unit=$1 missing=0 d
    shift
    for d in "$@"; do
        if ! grep -qxF -- "$d" "$unit" && ! grep -q "^${d}[0-9]" "$unit"; then
            echo "missing in $unit: $d"
            missing=1
        fi
    done
    return "$missing"
}
COMMON_DIRECTIVES=('DynamicUser=yes' 'User=cyan' 'AmbientCapabilities=CAP_NET_BIND_SERVICE'
    'CapabilityBoundingSet=CAP_NET_BIND_SERVICE' 'NoNewPrivileges=yes' 'ProtectSystem=strict'
    'ProtectHome=yes' 'PrivateTmp=yes' 'PrivateDevices=yes' 'ProtectKernelTunables=yes'
    'ProtectKernelModules=yes' 'ProtectKernelLogs=yes' 'ProtectControlGroups=yes'
    'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6' 'RestrictNamespaces=yes'
    'LockPersonality=yes' 'MemoryDenyWriteExecute=yes' 'SystemCallFilter=@system-service'
    'SystemCallArchitectures=native' 'UMask=0077' 'StateDirectory=cyan' 'RuntimeDirectory=cyan'
    'ConfigurationDirectory=cyan'
    'ExecStartPre=/usr/local/bin/cyan check --config /etc/cyan/cyan.toml'
    'ExecReload=/usr/local/bin/cyan ctl reload' 'KillSignal=SIGTERM' 'TimeoutStopSec=35'
    'Restart=on-failure' 'LimitNOFILE=')
check "systemd/cyan.service has the required directives" unit_directives systemd/cyan.service \
    "${COMMON_DIRECTIVES[@]}" 'Type=exec' \
    'ExecStart=/usr/local/bin/cyan run --config /etc/cyan/cyan.toml'
# The template: READY=1 only once it serves (after any hand-over); take over
# from the other instance or start normally; /run/cyan (the sockets) kept
# when the old instance stops; an instance that handed over (exit 0) is not
# restarted.
check "systemd/cyan@.service has the required directives" unit_directives systemd/cyan@.service \
    "${COMMON_DIRECTIVES[@]}" 'Type=notify' 'NotifyAccess=main' 'RuntimeDirectoryPreserve=yes' \
    'ExecStart=/usr/local/bin/cyan run --config /etc/cyan/cyan.toml --upgrade=auto'

# The template is cyan.service plus the upgrade settings: any other
# difference (a hardening directive dropped from one of them) is drift.
units_in_step() {
    "$PY" - <<'PYEOF'
import re, sys
def directives(path):
    out = []
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#") and re.match(r"^[A-Za-z]+=", line):
            out.append(line)
    return out
plain, tmpl = directives("systemd/cyan.service"), directives("systemd/cyan@.service")
allowed = ("Description=", "Type=", "NotifyAccess=", "ExecStart=", "RuntimeDirectoryPreserve=")
bad = [f"only in cyan.service: {d}" for d in plain if d not in tmpl and not d.startswith(allowed)]
bad += [f"only in cyan@.service: {d}" for d in tmpl if d not in plain and not d.startswith(allowed)]
print("\n".join(bad) or f"{len(tmpl)} directives, differences limited to {', '.join(allowed)}")
sys.exit(1 if bad else 0)
PYEOF
}
check "systemd/cyan@.service = cyan.service + upgrade settings (no drift)" units_in_step

# ------------------------------------------------------------- kubernetes
# Structural checks on a stream of Kubernetes objects (the kustomize output,
# or the raw files when kubectl is missing).
cat >"$WORK/k8s_check.py" <<'PYEOF'
import sys, yaml
docs = []
for path in sys.argv[1:]:
    with open(path) as f:
        docs += [d for d in yaml.safe_load_all(f) if d]
kinds = {d["kind"]: d for d in docs}
want = {"Deployment", "Service", "PodDisruptionBudget"}
if any(p.endswith("rendered.yaml") for p in sys.argv[1:]):
    want.add("ConfigMap")
missing = want - kinds.keys()
assert not missing, f"missing kinds: {missing}"
dep = kinds["Deployment"]
pod = dep["spec"]["template"]
spec = pod["spec"]
ann = pod["metadata"].get("annotations", {})
assert ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "9900", "scrape annotations"
assert spec["terminationGracePeriodSeconds"] >= 35, "terminationGracePeriodSeconds < 35"
psc = spec["securityContext"]
assert psc["runAsNonRoot"] is True, "pod runAsNonRoot"
assert psc["seccompProfile"]["type"] == "RuntimeDefault", "seccompProfile"
(c,) = [c for c in spec["containers"] if c["name"] == "cyan"]
sc = c["securityContext"]
assert sc["readOnlyRootFilesystem"] is True, "readOnlyRootFilesystem"
assert sc["allowPrivilegeEscalation"] is False, "allowPrivilegeEscalation"
assert sc["capabilities"]["drop"] == ["ALL"], "capabilities drop ALL"
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
assert ports.get("metrics") == 9900, "metrics port"
def probe_port(p):
    port = p["httpGet"]["port"]
    return ports.get(port, port)
assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and probe_port(c["readinessProbe"]) == 9900, "readiness"
assert c["livenessProbe"]["httpGet"]["path"] == "/livez" and probe_port(c["livenessProbe"]) == 9900, "liveness"
pre = c["lifecycle"]["preStop"]
assert "sleep" in pre or "exec" in pre, "preStop sleep"
assert "requests" in c["resources"] and "limits" in c["resources"], "resources"
mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
vols = {v["name"]: v for v in spec["volumes"]}
assert "configMap" in vols[mounts["/etc/cyan"]], "/etc/cyan from a ConfigMap"
assert "emptyDir" in vols[mounts["/var/lib/cyan"]] or "persistentVolumeClaim" in vols[mounts["/var/lib/cyan"]], "/var/lib/cyan"
assert "emptyDir" in vols[mounts["/run/cyan"]], "/run/cyan"
svc = kinds["Service"]["spec"]
assert svc["type"] == "LoadBalancer" and svc["externalTrafficPolicy"] == "Local", "Service LB/Local"
sel = dep["spec"]["selector"]["matchLabels"]
for name, obj in (("Service", svc), ("PodDisruptionBudget", kinds["PodDisruptionBudget"]["spec"])):
    s = obj["selector"] if name == "Service" else obj["selector"]["matchLabels"]
    assert s == sel, f"{name} selector {s} != Deployment selector {sel}"
    assert all(pod["metadata"]["labels"].get(k) == v for k, v in s.items()), f"{name} selects no pod"
if "ConfigMap" in kinds:
    cm = kinds["ConfigMap"]
    assert "cyan.toml" in cm["data"], "ConfigMap has no cyan.toml"
    assert vols[mounts["/etc/cyan"]]["configMap"]["name"] == cm["metadata"]["name"], "ConfigMap name not wired"
print("ok:", ", ".join(sorted(kinds)))
PYEOF
if command -v kubectl >/dev/null 2>&1; then
    check "kubectl kustomize k8s" bash -c "kubectl kustomize k8s >'$WORK/rendered.yaml'"
    check "k8s rendered objects (probes, securityContext, grace period, selectors)" \
        "$PY" "$WORK/k8s_check.py" "$WORK/rendered.yaml"
else
    skip "kubectl kustomize (kubectl not installed)"
    check "k8s YAML parses" "$PY" -c '
import sys, yaml
for p in sys.argv[1:]:
    list(yaml.safe_load_all(open(p)))
' k8s/kustomization.yaml k8s/deployment.yaml k8s/service.yaml k8s/pdb.yaml
    check "k8s objects (probes, securityContext, grace period, selectors)" \
        "$PY" "$WORK/k8s_check.py" k8s/deployment.yaml k8s/service.yaml k8s/pdb.yaml
fi

# ---------------------------------------------------------- cyan configs
toml_check() {
    "$PY" - "$1" "$2" <<'PYEOF'
import sys, tomllib
path, where = sys.argv[1], sys.argv[2]
cfg = tomllib.load(open(path, "rb"))
assert cfg["metrics"]["listen"] == "0.0.0.0:9900", "[metrics] listen must be 0.0.0.0:9900 in " + where
assert cfg["admin"]["socket"] == "/run/cyan/admin.sock", "[admin] socket"
assert cfg["state"]["dir"] == "/var/lib/cyan", "[state] dir"
assert cfg["runtime"]["drain_timeout"] == "25s", "[runtime] drain_timeout"
names = [s["name"] for s in cfg["service"]]
assert "gateway" in names, "service gateway"
print("ok")
PYEOF
}
check "docker/cyan.toml parses, contract keys" toml_check docker/cyan.toml container
check "k8s/cyan.toml parses, contract keys" toml_check k8s/cyan.toml kubernetes
CYAN=${CYAN_BIN:-$(command -v cyan || true)}
if [ -n "$CYAN" ] && [ -x "$CYAN" ]; then
    check "cyan check --config docker/cyan.toml" "$CYAN" check --config docker/cyan.toml
    check "cyan check --config k8s/cyan.toml" "$CYAN" check --config k8s/cyan.toml
    # The units' command lines parse with this cyan (`--help` stops before
    # anything runs; an unknown flag or value still exits 2).
    exec_start_parses() {
        local unit line
        for unit in $UNITS; do
            for line in $(sed -n 's/^ExecStart=\/usr\/local\/bin\/cyan //p' "$unit" | tr ' ' '\001'); do
                line=$(printf '%s' "$line" | tr '\001' ' ')
                # shellcheck disable=SC2086
                "$CYAN" $line --help >/dev/null || { echo "$unit: cyan $line: does not parse"; return 1; }
                echo "$unit: cyan $line"
            done
        done
    }
    check "systemd units' ExecStart parses with this cyan" exec_start_parses
else
    skip "cyan check on the example configs (no cyan binary; set CYAN_BIN)"
fi

# ---------------------------------------------------------------- grafana
check "grafana/cyan.json is valid JSON" "$PY" -m json.tool grafana/cyan.json

grafana_structure() {
    "$PY" - <<'PYEOF'
import json
d = json.load(open("grafana/cyan.json"))
assert 36 <= d["schemaVersion"] <= 41, "schemaVersion"
tv = {v["name"]: v for v in d["templating"]["list"]}
assert tv["DS_PROMETHEUS"]["type"] == "datasource" and tv["DS_PROMETHEUS"]["query"] == "prometheus"
q = tv["service"]["query"]
q = q["query"] if isinstance(q, dict) else q
assert q == "label_values(cyan_requests_total, service)", q
panels = [p for p in d["panels"] if p["type"] != "row"]
for p in panels:
    assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    for t in p["targets"]:
        assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
for needed in ["cyan_candidate_share_ratio", "cyan_requests_total", "cyan_upstream_errors_total",
               "cyan_request_duration_seconds_bucket", "cyan_endpoint_up", "cyan_connections_open",
               "cyan_table_generation"]:
    assert needed in exprs, "no panel uses " + needed
assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs, "p50/p99"
ann = [a for a in d["annotations"]["list"] if "cyan_rollbacks_total" in a.get("expr", "")]
assert ann and "changes(" in ann[0]["expr"], "rollback annotation"
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), "duplicate panel ids"
print(len(panels), "panels")
PYEOF
}
check "grafana dashboard structure (variables, panels, rollback annotation)" grafana_structure

# ------------------------------------------------------------------ PromQL
# Every expression (rules, dashboard panels, annotations, variables) may only
# use cyan's documented metric families, process_* and our recorded series.
cat >"$WORK/promql.py" <<'PYEOF'
import json, re, sys, yaml
mode = sys.argv[1]
FAMILIES = """cyan_requests_total cyan_request_duration_seconds cyan_requests_in_flight
cyan_upstream_errors_total cyan_retries_total cyan_candidate_share_ratio cyan_stable_color_info
cyan_endpoint_up cyan_health_checks_total cyan_rollbacks_total cyan_rollout_step
cyan_table_generation cyan_config_reloads_total cyan_connections_open
cyan_tls_handshake_errors_total cyan_tls_cert_not_after_timestamp_seconds cyan_build_info""".split()
allowed = set(FAMILIES)
allowed |= {"cyan_request_duration_seconds" + s for s in ("_bucket", "_sum", "_count")}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "offset", "bool", "inf", "nan", "Inf", "NaN",
            # aggregation operators may be followed by `by (...)` instead of `(`
            "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
            "count_values", "bottomk", "topk", "quantile"}

rules = yaml.safe_load(open("prometheus/cyan-rules.yml"))
recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
exprs = [(f'rule {r.get("record") or r.get("alert")}', r["expr"]) for g in rules["groups"] for r in g["rules"]]
dash = json.load(open("grafana/cyan.json"))
for p in dash["panels"]:
    for t in p.get("targets", []):
        exprs.append((f'panel "{p["title"]}"', t["expr"]))
for a in dash["annotations"]["list"]:
    if "expr" in a:
        exprs.append((f'annotation "{a["name"]}"', a["expr"]))
for v in dash["templating"]["list"]:
    q = v.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    if v["type"] == "query" and q:
        m = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)\s*", q)
        exprs.append((f'variable {v["name"]}', m.group(1) if m else q))

def grafana_to_promql(e):
    e = e.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", e)

def metric_names(e):
    e = grafana_to_promql(e)
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', e)   # strings
    e = re.sub(r"\{[^}]*\}", " ", e)                                  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                 # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", e)
    names = set()
    for m in re.finditer(r"\b[A-Za-z_:][\w:]*\b", e):
        if re.match(r"\s*\(", e[m.end():]) or m.group(0) in KEYWORDS:
            continue                                                  # function or keyword
        names.add(m.group(0))
    return names

if mode == "names":
    bad = []
    for where, e in exprs:
        for n in sorted(metric_names(e)):
            if n not in allowed and n not in recorded and not n.startswith("process_"):
                bad.append(f"{where}: unknown metric {n}")
    print("\n".join(bad) or f"{len(exprs)} expressions use known metrics only")
    sys.exit(1 if bad else 0)
else:
    # Write the dashboard queries as recording rules so promtool parses them.
    out = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": grafana_to_promql(e)}
        for i, (where, e) in enumerate(exprs) if not where.startswith("rule ")]}]}
    yaml.safe_dump(out, open(sys.argv[2], "w"))
PYEOF
check "PromQL uses only cyan's metric families (rules + dashboard)" "$PY" "$WORK/promql.py" names
if command -v promtool >/dev/null 2>&1; then
    dashboard_promql() {
        "$PY" "$WORK/promql.py" parse "$WORK/dashboard-rules.yml" && promtool check rules "$WORK/dashboard-rules.yml"
    }
    check "dashboard PromQL parses (promtool)" dashboard_promql
fi

# ----------------------------------------------------------------- docker
dockerfile_check() {
    local f=docker/Dockerfile ok=0 user
    grep -q '^FROM rust:1-bookworm AS ' "$f" || { echo "no rust:1-bookworm builder stage"; ok=1; }
    grep -q 'cargo build --release --locked' "$f" || { echo "no cargo build --release --locked"; ok=1; }
    grep -Eq '^FROM (gcr\.io/distroless/cc-debian12:nonroot|debian:bookworm-slim)' "$f" || { echo "unexpected runtime base"; ok=1; }
    user=$(sed -n 's/^USER[[:space:]]\+\([^[:space:]]*\).*/\1/p' "$f" | tail -n 1)
    case "${user%%:*}" in
        "" | root | 0) echo "last USER is '${user:-unset}', not a non-root user"; ok=1 ;;
    esac
    grep -Eq '^EXPOSE 8080 8443 9900$' "$f" || { echo "EXPOSE 8080 8443 9900 missing"; ok=1; }
    grep -q '^STOPSIGNAL SIGTERM$' "$f" || { echo "STOPSIGNAL SIGTERM missing"; ok=1; }
    grep -q '^VOLUME .*/etc/cyan.*/var/lib/cyan' "$f" || { echo "VOLUME /etc/cyan /var/lib/cyan missing"; ok=1; }
    grep -qF 'ENTRYPOINT ["/usr/local/bin/cyan", "run", "--config", "/etc/cyan/cyan.toml"]' "$f" ||
        { echo "ENTRYPOINT missing"; ok=1; }
    echo "USER $user"
    return "$ok"
}
check "docker/Dockerfile (stages, non-root USER, ports, volumes, stop signal)" dockerfile_check

readme_check() {
    local s ok=0
    for s in 'systemctl enable --now cyan' 'systemctl reload cyan' 'docker run' 'kubectl apply -k' \
        'cyan@.service' 'systemctl start cyan@b' 'upgrade_socket' \
        'scrape.yml' 'cyan-rules.yml' 'cyan.json'; do
        grep -qF -- "$s" README.md || { echo "README.md does not mention: $s"; ok=1; }
    done
    return "$ok"
}
check "README.md covers systemd (upgrades included), docker, k8s, prometheus, grafana" readme_check

echo "deploy-checks: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
