#!/usr/bin/env bash
# Runs the units of deploy/systemd under a real systemd: PID 1 of a
# systemd-nspawn container booted from a minimal Debian 12 tree, with the
# built idgate binary, these units, the sysusers.d and tmpfiles.d files, a
# policy, an entry and a workload service in idgate.slice. Then checks the
# boot order, enforcement, reload, restart, stop, `idgate run`, the
# directories, and that a workload does not start when the agent cannot.
#
# A manual check, heavier than deploy/validate.sh: needs root, apt (it
# installs debootstrap and systemd-container when missing), Debian's
# package mirror, and a built idgate (cargo xtask build). The first run
# spends about two minutes on debootstrap; the tree is kept in
# target/nspawn-root and reused.
#
# The container runs with SYSTEMD_SECCOMP=0 (nspawn's own seccomp filter
# refuses bpf(2)) and a tmpfs at /sys/fs/bpf (nspawn's /sys has no
# /sys/fs/bpf); the cgroup hierarchy in it is unified (cgroup v2 only).
#
# Usage: deploy/systemd/check-in-nspawn.sh   Last line: `nspawn: N passed, M failed`.

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
TREE="$ROOT/target/nspawn-root"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOG="$ROOT/target/nspawn-console.log"

[ "$(id -u)" = 0 ] || { echo "nspawn: needs root"; exit 2; }
binary=""
for candidate in target/release/idgate target/debug/idgate; do
    if [ -x "$candidate" ]; then binary=$candidate; break; fi
done
[ -n "$binary" ] || { echo "nspawn: no built idgate (cargo xtask build)"; exit 2; }
if ! command -v systemd-nspawn >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get install -y --no-install-recommends systemd-container debootstrap >/dev/null
fi
if [ ! -x "$TREE/usr/lib/systemd/systemd" ]; then
    echo "nspawn: debootstrap of Debian 12 into $TREE"
    rm -rf "$TREE"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps \
        bookworm "$TREE" "$MIRROR" >"$ROOT/target/nspawn-debootstrap.log"
fi

# --- install, as docs/install-host.md does ----------------------------------
install -m 0755 "$binary" "$TREE/usr/local/bin/idgate"
install -m 0644 deploy/systemd/idgate.service deploy/systemd/idgate-bpffs.service \
    deploy/systemd/idgate.slice "$TREE/etc/systemd/system/"
install -D -m 0644 deploy/systemd/sysusers.d/idgate.conf "$TREE/etc/sysusers.d/idgate.conf"
install -D -m 0644 deploy/systemd/tmpfiles.d/idgate.conf "$TREE/etc/tmpfiles.d/idgate.conf"
rm -rf "$TREE/etc/idgate" "$TREE/var/lib/idgate" "$TREE/var/log/idgate"
mkdir -p "$TREE/etc/idgate/policy" "$TREE/etc/idgate/entries"
cat >"$TREE/etc/idgate/agent.toml" <<'EOF'
trust_domains = ["example.org"]
[events]
audit_log = "/var/log/idgate/audit.log"
EOF
cat >"$TREE/etc/idgate/policy/web.toml" <<'EOF'
mode = "enforce"
[unknown]
default = "deny"
[[identity]]
id = "spiffe://example.org/web"
default = "deny"
[[identity.egress]]
name = "local-api"
to = ["127.0.0.1/32"]
ports = [8080]
protocol = "tcp"
action = "allow"
EOF
cat >"$TREE/etc/idgate/entries/web.toml" <<'EOF'
[[entry]]
id = "spiffe://example.org/web"
selectors = ["systemd:unit:idgate-web.service", "unix:uid:65534", "unix:path:/usr/bin/bash"]
EOF
# The workload: bash builtins only (every process of its cgroup is bash),
# trying an allowed port and a denied one every two seconds.
cat >"$TREE/etc/systemd/system/idgate-web.service" <<'EOF'
[Unit]
Description=a workload judged by idgate
[Service]
Slice=idgate.slice
User=nobody
ExecStart=/bin/bash -c 'mkfifo /tmp/f; exec 9<>/tmp/f; while :; do for p in 8080 22; do if (exec 3<>/dev/tcp/127.0.0.1/$$p) 2>/tmp/err; then echo "port $$p: connected"; else read -r e < /tmp/err; echo "port $$p: $${e##*: }"; fi; done; read -t 2 -u 9; done'
PrivateTmp=yes
[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$TREE/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/idgate.service "$TREE/etc/systemd/system/multi-user.target.wants/idgate.service"
ln -sf /etc/systemd/system/idgate-web.service "$TREE/etc/systemd/system/multi-user.target.wants/idgate-web.service"
echo idgate-nspawn >"$TREE/etc/hostname"

# --- boot ---------------------------------------------------------------------
SYSTEMD_SECCOMP=0 SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -D "$TREE" -b \
    --register=no --keep-unit --capability=all --private-network \
    --tmpfs=/sys/fs/bpf --console=read-only >"$LOG" 2>&1 &
NSPAWN=$!
leader=""
stop_container() {
    if [ -n "$leader" ] && kill -0 "$NSPAWN" 2>/dev/null; then
        nsenter -t "$leader" -a systemctl poweroff >/dev/null 2>&1 || true
        for _ in $(seq 30); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.5; done
    fi
    if kill -0 "$NSPAWN" 2>/dev/null; then kill "$NSPAWN"; fi
    wait "$NSPAWN" 2>/dev/null || true
}
trap stop_container EXIT
for _ in $(seq 60); do
    leader=$(pgrep -P "$NSPAWN" | head -1 || true)
    [ -n "$leader" ] && [ "$(cat "/proc/$leader/comm" 2>/dev/null)" = systemd ] && break
    leader=""
    sleep 0.5
done
[ -n "$leader" ] || { echo "nspawn: the container did not boot"; cat "$LOG"; exit 1; }
ct() { nsenter -t "$leader" -a "$@"; }
ct systemctl is-system-running --wait >/dev/null 2>&1 || true

passed=0
failed=0
check() {
    local name=$1
    shift
    if "$@" >"$ROOT/target/nspawn-check.log" 2>&1; then
        echo "ok   $name"; passed=$((passed + 1))
    else
        echo "FAIL $name"; sed 's/^/     | /' "$ROOT/target/nspawn-check.log"; failed=$((failed + 1))
    fi
}
# Waits up to 30 s for the workload's last two lines to be: allowed port
# let through (refused: nobody listens), the other denied.
enforced() {
    for _ in $(seq 60); do
        local tail
        local since=()
        [ -z "${1:-}" ] || since=(--since "$1")
        tail=$(ct journalctl -u idgate-web --no-pager -o cat -n 2 "${since[@]}" 2>/dev/null || true)
        if echo "$tail" | grep -qx 'port 8080: Connection refused' &&
            echo "$tail" | grep -qx 'port 22: Operation not permitted'; then
            return 0
        fi
        sleep 0.5
    done
    ct journalctl -u idgate-web --no-pager -o cat -n 4
    return 1
}
mono() { ct systemctl show -p "$2" --value "$1"; }

check "boot: idgate-bpffs, idgate (ready), idgate.slice, the workload, in that order" sh -c "
    b=\$(nsenter -t $leader -a systemctl show -p ActiveEnterTimestampMonotonic --value idgate-bpffs.service)
    a=\$(nsenter -t $leader -a systemctl show -p ActiveEnterTimestampMonotonic --value idgate.service)
    s=\$(nsenter -t $leader -a systemctl show -p ActiveEnterTimestampMonotonic --value idgate.slice)
    w=\$(nsenter -t $leader -a systemctl show -p ExecMainStartTimestampMonotonic --value idgate-web.service)
    echo \"bpffs \$b agent \$a slice \$s workload \$w\"
    [ \$b -gt 0 ] && [ \$b -le \$a ] && [ \$a -le \$s ] && [ \$s -le \$w ]"
check "bpffs mounted at /sys/fs/bpf, pins under /sys/fs/bpf/idgate" \
    ct sh -c 'test "$(stat -f -c %T /sys/fs/bpf)" = bpf_fs && ls /sys/fs/bpf/idgate/idgate_connect4@*'
check "the workload is bound; allowed port let through, other denied" enforced
check "/run/idgate is 2751 root:idgate, the control socket group idgate" \
    ct sh -c 'test "$(stat -c "%a %U:%G" /run/idgate)" = "2751 root:idgate" &&
              test "$(stat -c %G /run/idgate/control.sock)" = idgate'
check "systemctl reload idgate reloads the policy" ct sh -c '
    systemctl reload idgate && sleep 1 &&
    journalctl -u idgate --no-pager -o cat | grep -q "policy reloaded"'
pid=$(mono idgate-web.service MainPID)
check "systemctl restart idgate: the workload keeps running, the pins are adopted" ct sh -c "
    systemctl restart idgate &&
    test \"\$(systemctl show -p MainPID --value idgate-web.service)\" = $pid &&
    idgate status | grep -q 'programs.adopted.*idgate_connect4'"
ct systemctl stop idgate.service
since=$(ct date '+%Y-%m-%d %H:%M:%S')
sleep 3
check "with the agent stopped the workload runs and is still judged" sh -c "
    nsenter -t $leader -a systemctl is-active idgate-web.service &&
    ! nsenter -t $leader -a systemctl is-active idgate.service"
check "  ... (its connects after the stop)" enforced "$since"
ct systemctl start idgate.service
check "idgate run: a command with an identity is judged by it" ct sh -c '
    ! idgate run --identity spiffe://example.org/web -- bash -c "exec 3<>/dev/tcp/127.0.0.1/22" 2>/tmp/run.err &&
    grep -q "Operation not permitted" /tmp/run.err'
check "the audit log records the denials" ct sh -c 'grep -q "\"verdict\":\"deny\"" /var/log/idgate/audit.log'

# Fail closed: no pins (as after a reboot) and an agent that cannot start.
ct sh -c 'systemctl stop idgate-web.service idgate.service idgate.slice;
          idgate uninstall --config /etc/idgate/agent.toml >/dev/null;
          cp /etc/idgate/policy/web.toml /tmp/web.toml;
          echo "mode = \"nonsense\"" > /etc/idgate/policy/web.toml'
check "with no pins and a broken policy, the workload does not start" ct sh -c '
    ! systemctl start idgate-web.service 2>/dev/null &&
    ! systemctl is-active idgate-web.service'
ct sh -c 'cp /tmp/web.toml /etc/idgate/policy/web.toml; systemctl reset-failed'
check "  ... and starts again once the agent can" ct sh -c 'systemctl start idgate-web.service'

echo "nspawn: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
