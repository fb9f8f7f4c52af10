#!/usr/bin/env bash
# Validates the deployment files under deploy/ with real tools:
#
#   Kubernetes  the kustomization rendered by `kubectl kustomize`, and the
#               example workload, against the Kubernetes API schemas
#               (kubernetes-validate --strict: unknown fields are errors) for
#               the oldest supported (1.30) and the newest bundled (1.37)
#               version; then the checkov security linter, which must report
#               no failed check (each finding that cannot be fixed is skipped
#               in the manifest with its reason).
#   container   checkov's Dockerfile checks on deploy/container/Containerfile
#               (static only: no container engine runs here to build it).
#   systemd     `systemd-analyze verify` of idgate.service, idgate-bpffs.service,
#               idgate.slice
#               and of a unit that runs in the slice (dependency cycles,
#               unknown keys, missing executables: any message fails);
#               `systemd-analyze security` with an exposure ceiling;
#               systemd-sysusers and systemd-tmpfiles applying the
#               sysusers.d and tmpfiles.d files to a scratch root.
#   commands    the shell commands that mount bpffs (the DaemonSet's init
#               container, idgate-bpffs.service) run for real in a
#               private mount namespace (root only).
#   idgate      `idgate policy check` on the shipped policies, and the
#               shipped TOML files parse (needs a built idgate binary).
#
# Python tools go into a virtual environment under target/ (pinned in
# deploy/validate-requirements.txt), installed once and reused while the
# pins do not change. A check whose tool is missing here is skipped with
# the reason printed, never counted as passed; with IDGATE_E2E set (to
# anything but empty or 0, as .ci/run sets it) it fails instead.
#
# The units under a running systemd (PID 1 of a container): a heavier,
# manual check, deploy/systemd/check-in-nspawn.sh.
#
# Usage: deploy/validate.sh   (from anywhere; exit status 0 only if every
# check run passed). The last line reads `deploy: N passed, M failed`.

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DEPLOY=deploy
WORK="$ROOT/target/deploy-validate"
VENV="$ROOT/target/deploy-venv"
REQUIREMENTS="$DEPLOY/validate-requirements.txt"
# Kubernetes versions the manifests must be valid for. 1.30 is the oldest:
# the agent container's securityContext.appArmorProfile field is from 1.30.
K8S_VERSIONS=(1.30.0 1.37.0)
# systemd-analyze security's overall exposure, times ten (2.6 now).
EXPOSURE_CEILING=30

passed=0
failed=0
skipped=0
pass() { echo "ok   $1"; passed=$((passed + 1)); }
fail() {
    echo "FAIL $1"
    if [ -n "${2:-}" ] && [ -s "$2" ]; then sed 's/^/     | /' "$2"; fi
    failed=$((failed + 1))
}
skip() {
    if [ -n "${IDGATE_E2E:-}" ] && [ "$IDGATE_E2E" != 0 ]; then
        echo "FAIL $1: cannot run here: $2 (IDGATE_E2E is set)"
        failed=$((failed + 1))
    else
        echo "skip $1: $2"
        skipped=$((skipped + 1))
    fi
}

# Runs a check: its name, then the command. Output is shown only when it
# fails.
check() {
    local name=$1
    shift
    local log="$WORK/log"
    if "$@" >"$log" 2>&1; then pass "$name"; else fail "$name" "$log"; fi
}

# As check, but any output at all is a failure too (systemd-analyze verify
# exits 0 after printing warnings).
check_silent() {
    local name=$1
    shift
    local log="$WORK/log"
    if "$@" >"$log" 2>&1 && [ ! -s "$log" ]; then pass "$name"; else fail "$name" "$log"; fi
}

rm -rf "$WORK"
mkdir -p "$WORK"

# --- Python tools ----------------------------------------------------------
stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "deploy: Python tools already in $VENV"
else
    echo "deploy: installing Python tools into $VENV (pinned: $REQUIREMENTS)"
    started=$(date +%s)
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-input -r "$REQUIREMENTS"
    echo "$want" >"$stamp"
    echo "deploy: installed in $(($(date +%s) - started)) s"
fi
KV="$VENV/bin/kubernetes-validate"
CHECKOV="$VENV/bin/checkov"
PY="$VENV/bin/python"

# checkov: offline, no update check, only what is asked.
checkov_clean() {
    # $1 framework, $2 file. Passes when checkov reports no failed check.
    local out="$WORK/checkov.out"
    (cd "$(dirname "$2")" && "$CHECKOV" --quiet --compact --skip-download \
        --framework "$1" -f "$(basename "$2")") >"$out" 2>&1 || true
    cat "$out"
    grep -Eq 'Passed checks: [0-9]+, Failed checks: 0,' "$out"
}

# --- Kubernetes --------------------------------------------------------------
K8S="$DEPLOY/kubernetes"
manifests=()
if command -v kubectl >/dev/null 2>&1; then
    rendered="$WORK/kubernetes-rendered.yaml"
    check "kubernetes: kubectl kustomize $K8S renders" \
        sh -c "kubectl kustomize '$K8S' > '$rendered'"
    manifests+=("$rendered")
else
    skip "kubernetes: kustomize render" "kubectl is not installed; the manifest files are validated one by one instead"
    for f in "$K8S"/namespace.yaml "$K8S"/rbac.yaml "$K8S"/daemonset.yaml "$K8S"/networkpolicy.yaml; do
        manifests+=("$f")
    done
fi
manifests+=("$K8S/examples/workload.yaml")

for m in "${manifests[@]}"; do
    for v in "${K8S_VERSIONS[@]}"; do
        check "kubernetes: $(basename "$m") valid for Kubernetes $v (strict schema)" \
            "$KV" --strict --quiet --no-warn -k "$v" "$m"
    done
    check "kubernetes: checkov finds nothing in $(basename "$m")" checkov_clean kubernetes "$m"
done

# The rendered objects are the ones the docs promise.
if [ -n "${rendered:-}" ] && [ -s "${rendered:-}" ]; then
    check "kubernetes: rendered objects are the expected ones" "$PY" - "$rendered" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = sorted((d["kind"], d["metadata"]["name"].rsplit("-", 1)[0]
                if d["metadata"]["name"].startswith("idgate-agent-config-")
                else d["metadata"]["name"]) for d in docs)
want = sorted([
    ("Namespace", "idgate-system"), ("ServiceAccount", "idgate-agent"),
    ("ClusterRole", "idgate-agent"), ("ClusterRoleBinding", "idgate-agent"),
    ("ConfigMap", "idgate-agent-config"), ("ConfigMap", "idgate-policy"),
    ("ConfigMap", "idgate-entries"), ("DaemonSet", "idgate-agent"),
    ("NetworkPolicy", "idgate-agent")])
assert kinds == want, kinds
ds = next(d for d in docs if d["kind"] == "DaemonSet")
spec = ds["spec"]["template"]["spec"]
agent = spec["containers"][0]
assert not agent["securityContext"].get("privileged"), "agent container privileged"
assert spec["hostPID"] is True
assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
# The policy and entries ConfigMaps must keep fixed names (updated in place).
names = {v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v}
assert {"idgate-policy", "idgate-entries"} <= names, names
print("ok")
EOF
fi

# --- container build file ------------------------------------------------------
# checkov recognises build files by the name Dockerfile.
mkdir -p "$WORK/container"
cp "$DEPLOY/container/Containerfile" "$WORK/container/Dockerfile"
check "container: checkov finds nothing in Containerfile" checkov_clean dockerfile "$WORK/container/Dockerfile"

# --- systemd -----------------------------------------------------------------
SD="$DEPLOY/systemd"
if command -v systemd-analyze >/dev/null 2>&1; then
    # A scratch root with the units installed where the docs put them, the
    # distribution's own units beside them, and stand-ins for the
    # executables the units name (verify checks that they exist).
    sroot="$WORK/systemd-root"
    mkdir -p "$sroot/etc/systemd/system" "$sroot/usr/lib/systemd" "$sroot/usr/local/bin" "$sroot/usr/bin" "$sroot/bin"
    for dir in /usr/lib/systemd/system /lib/systemd/system; do
        if [ -d "$dir" ]; then cp -a "$dir" "$sroot/usr/lib/systemd/"; break; fi
    done
    for exe in usr/local/bin/idgate bin/sh usr/bin/timeout bin/kill usr/bin/sleep; do
        printf '#!/bin/sh\n' >"$sroot/$exe"
        chmod 0755 "$sroot/$exe"
    done
    cp "$SD/idgate.service" "$SD/idgate-bpffs.service" "$SD/idgate.slice" "$sroot/etc/systemd/system/"
    # A workload judged by idgate, as docs/install-host.md shows one.
    cat >"$sroot/etc/systemd/system/idgate-validate-workload.service" <<'EOF'
[Unit]
Description=A workload in idgate.slice
[Service]
Slice=idgate.slice
ExecStart=/usr/bin/sleep infinity
EOF
    verify() {
        systemd-analyze verify --man=no --generators=no --root="$sroot" "$@"
    }
    check_silent "systemd: systemd-analyze verify idgate.service" verify idgate.service
    check_silent "systemd: systemd-analyze verify idgate-bpffs.service" verify idgate-bpffs.service
    check_silent "systemd: systemd-analyze verify idgate.slice" verify idgate.slice
    check_silent "systemd: a unit with Slice=idgate.slice verifies (no ordering cycle)" verify idgate-validate-workload.service
    # Found under a running systemd 252: ProtectKernelTunables=yes leaves
    # /sys/fs/bpf read-only whatever ReadWritePaths= says, and the agent
    # cannot pin. Keep it out, and keep the writable paths.
    check "systemd: idgate.service leaves /sys/fs/bpf and /sys/fs/cgroup writable" sh -c "
        ! grep -Eq '^ProtectKernelTunables=(yes|true|on|1)' '$SD/idgate.service' &&
        ! grep -Eq '^ProtectControlGroups=(yes|true|on|1|strict)' '$SD/idgate.service' &&
        grep -Eq '^ReadWritePaths=.*/sys/fs/bpf( |$)' '$SD/idgate.service' &&
        grep -Eq '^ReadWritePaths=.*/sys/fs/cgroup( |$)' '$SD/idgate.service'"
    check "systemd: security exposure of idgate.service at most $((EXPOSURE_CEILING / 10)).$((EXPOSURE_CEILING % 10))" \
        systemd-analyze security --offline=yes --no-pager --root="$sroot" --threshold="$EXPOSURE_CEILING" idgate.service

    # sysusers.d and tmpfiles.d applied to a scratch root.
    froot="$WORK/files-root"
    mkdir -p "$froot/etc" "$froot/usr/lib/sysusers.d" "$froot/usr/lib/tmpfiles.d" "$froot/run"
    : >"$froot/etc/passwd"
    : >"$froot/etc/group"
    cp "$SD/sysusers.d/idgate.conf" "$froot/usr/lib/sysusers.d/idgate.conf"
    cp "$SD/tmpfiles.d/idgate.conf" "$froot/usr/lib/tmpfiles.d/idgate.conf"
    if command -v systemd-sysusers >/dev/null 2>&1 && command -v systemd-tmpfiles >/dev/null 2>&1; then
        check "systemd: sysusers.d/idgate.conf makes the group idgate" sh -c "
            systemd-sysusers --root='$froot' idgate.conf &&
            grep -q '^idgate:x:[0-9]*:' '$froot/etc/group'"
        # Ownership and mode are asserted, by number, as the docs describe.
        check "systemd: tmpfiles.d/idgate.conf makes /run/idgate 2751 and /etc/idgate 0750, group idgate" sh -c "
            systemd-tmpfiles --root='$froot' --create idgate.conf &&
            gid=\$(awk -F: '\$1 == \"idgate\" {print \$3}' '$froot/etc/group') &&
            test \"\$(stat -c '%a %u %g' '$froot/run/idgate')\" = \"2751 0 \$gid\" &&
            test \"\$(stat -c '%a %u %g' '$froot/etc/idgate')\" = \"750 0 \$gid\" &&
            test -d '$froot/etc/idgate/policy' && test -d '$froot/etc/idgate/entries'"
    else
        skip "systemd: sysusers.d and tmpfiles.d" "systemd-sysusers or systemd-tmpfiles is not installed"
    fi
else
    skip "systemd: unit checks" "systemd-analyze is not installed (Debian: apt-get install systemd)"
fi

# --- the bpffs mount commands, run for real -------------------------------------
# Both commands must mount bpffs on /sys/fs/bpf when something else is
# there, and leave an existing bpffs alone. Run in a private mount
# namespace with a tmpfs over /sys/fs/bpf: nothing leaks to this host.
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null 2>&1 && unshare -m true 2>/dev/null; then
    init_cmd=$("$PY" - "$DEPLOY/kubernetes/daemonset.yaml" <<'EOF'
import sys, yaml
ds = yaml.safe_load(open(sys.argv[1]))
c = ds["spec"]["template"]["spec"]["initContainers"][0]
assert c["command"][:2] == ["/bin/sh", "-c"], c["command"]
print(c["command"][2])
EOF
)
    # idgate-bpffs.service's command, as systemd runs it: `%%` -> `%`, the
    # single-quoted argument of sh -c.
    unit_cmd=$(sed -n "s/^ExecStart=\/bin\/sh -c '\(.*\)'$/\1/p" "$SD/idgate-bpffs.service" | sed 's/%%/%/g')
    [ -n "$unit_cmd" ] || { fail "commands: idgate-bpffs.service has its ExecStart=/bin/sh -c '...' line"; unit_cmd=false; }
    for which in init unit; do
        if [ "$which" = init ]; then cmd=$init_cmd; else cmd=$unit_cmd; fi
        check "commands: the $which bpffs command mounts bpffs over another file system" \
            unshare -m --propagation private sh -c "
                mount -t tmpfs none /sys/fs/bpf &&
                test \"\$(stat -f -c %T /sys/fs/bpf)\" = tmpfs &&
                sh -c '$cmd' &&
                test \"\$(stat -f -c %T /sys/fs/bpf)\" = bpf_fs"
        check "commands: the $which bpffs command leaves a mounted bpffs alone" \
            unshare -m --propagation private sh -c "
                mount -t bpf bpf /sys/fs/bpf && mkdir /sys/fs/bpf/idgate-validate-mark &&
                sh -c '$cmd' &&
                test -d /sys/fs/bpf/idgate-validate-mark"
    done
else
    skip "commands: bpffs mount commands" "needs root and unshare -m (mount namespaces)"
fi

# --- idgate's own checks -----------------------------------------------------------
idgate=""
for candidate in target/debug/idgate target/release/idgate; do
    if [ -x "$candidate" ]; then idgate=$candidate; break; fi
done
if [ -n "$idgate" ]; then
    check "idgate: policy check deploy/kubernetes/config/policy" \
        "$idgate" policy check "$K8S/config/policy" --trust-domain example.org
else
    skip "idgate: policy check" "no built idgate binary (cargo xtask build)"
fi
check "idgate: the shipped agent configuration and entries are valid TOML" "$PY" - \
    "$K8S/config/agent.toml" "$K8S"/config/entries/*.toml <<'EOF'
import sys, tomllib
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        tomllib.load(f)
print("ok")
EOF

echo "deploy: $skipped skipped"
echo "deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
