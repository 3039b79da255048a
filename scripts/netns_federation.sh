#!/usr/bin/env bash
# A Veil federation over a misbehaving network, by hand: the coordinator and every member in its
# own Linux network namespace, on a bridge, optionally with a bandwidth limit on the members'
# links and a user-space proxy adding latency, dropped and cut connections. What the tests in
# tests/netns/ do (docs/deployment.md, "Tested on a misbehaving network"); everything it makes
# is removed at the end, also after a failure or Ctrl-C.
#
#   sudo scripts/netns_federation.sh [CONFIG] [OUT]
#
#   CONFIG      default examples/medical_diagnosis_secagg.toml (run in deployment mode)
#   OUT         the run folder, default runs/netns (emptied first)
#
# Impairments, from the environment (none by default):
#   RATE=20mbit        token bucket on both ends of every member's link (tc tbf)
#   LATENCY_MS=25      members connect through tests/netns/netns_proxy.py, which delays every
#   DROP=0.2           chunk by LATENCY_MS, resets new connections with probability DROP,
#   CUT_AFTER=60000    and resets a connection once it has carried CUT_AFTER bytes from the
#                      coordinator (any of the three starts the proxy)
#   PYTHON=...         the interpreter with Veil installed (default .venv/bin/python)
#
# Layout: namespace veilnt<PID>-hub holds bridge br0 with 10.77.0.1/24 (the coordinator) and one
# switch port m<i> per member; namespace veilnt<PID>-m<i> holds eth0 with 10.77.0.(10+i)/24.
# Unplug member 0 while it runs:  ip -n veilnt<PID>-hub link set m0 down   (and `up` again).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="$(realpath "${1:-$ROOT/examples/medical_diagnosis_secagg.toml}")"
OUT="$(realpath -m "${2:-$ROOT/runs/netns}")"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
P="veilnt$$"
HUB="$P-hub"
COORDINATOR=10.77.0.1

if [[ $(id -u) -ne 0 ]]; then echo "run as root: network namespaces need it" >&2; exit 1; fi
for tool in ip tc; do
    command -v "$tool" >/dev/null || { echo "'$tool' (iproute2) is not installed" >&2; exit 1; }
done

PIDS=()
NAMESPACES=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    echo "removed namespaces: ${NAMESPACES[*]:-none}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

run() { echo "+ $*"; "$@"; }

# 1. Every party's folder: the CA operator's and one per organisation, as `veil run` prepares them,
#    with the coordinator's certificate naming its address on the bridge. Writes the commands'
#    arguments (one per line) for step 4.
rm -rf "$OUT"
mkdir -p "$OUT"
"$PYTHON" - "$CONFIG" "$OUT" "$COORDINATOR" <<'EOF'
import sys
from pathlib import Path

from veil.crypto import pki
from veil.deployment import SERVER_NAME, load, prepare_deployment

config_path, out, coordinator = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
ca_dir, own = out / "ca", out / "orgs" / SERVER_NAME
for folder in (ca_dir, out / "orgs", own):
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
pki.init_ca(ca_dir)
csr = pki.request(own, SERVER_NAME, role="server", hosts=("localhost", coordinator), overwrite=True)
pki.sign_request(ca_dir, csr)
(own / pki.CA_CERT).write_bytes((ca_dir / pki.CA_CERT).read_bytes())
files = prepare_deployment(load(config_path), out, config_path=config_path)
(out / "server.args").write_text("\n".join(files.server_args(f"{coordinator}:0")) + "\n")
(out / "members").write_text("\n".join(files.clients) + "\n")
EOF
mapfile -t MEMBERS < "$OUT/members"

# 2. The namespaces: the coordinator's hub with its bridge, one namespace per member.
NAMESPACES+=("$HUB")
run ip netns add "$HUB"
run ip -n "$HUB" link set lo up
run ip -n "$HUB" link add br0 type bridge
run ip -n "$HUB" addr add "$COORDINATOR/24" dev br0
run ip -n "$HUB" link set br0 up
for i in "${!MEMBERS[@]}"; do
    ns="$P-m$i"
    NAMESPACES+=("$ns")
    run ip netns add "$ns"
    run ip -n "$ns" link set lo up
    run ip -n "$HUB" link add "m$i" type veth peer name eth0 netns "$ns"
    run ip -n "$HUB" link set "m$i" master br0
    run ip -n "$HUB" link set "m$i" up
    run ip -n "$ns" addr add "10.77.0.$((10 + i))/24" dev eth0
    run ip -n "$ns" link set eth0 up
    if [[ -n "${RATE:-}" ]]; then
        for end in "$HUB m$i" "$ns eth0"; do
            read -r where dev <<< "$end"
            run tc -n "$where" qdisc add dev "$dev" root tbf rate "$RATE" burst 32kbit latency 400ms
        done
    fi
done

# 3. The coordinator, in the hub.
mapfile -t SERVER_ARGS < "$OUT/server.args"
echo "+ ip netns exec $HUB $PYTHON -m veil.cli ${SERVER_ARGS[*]}"
ip netns exec "$HUB" "$PYTHON" -m veil.cli "${SERVER_ARGS[@]}" > "$OUT/logs/server.log" 2>&1 &
SERVER=$!
PIDS+=("$SERVER")
for _ in $(seq 600); do
    [[ -s "$OUT/server.port" ]] && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/logs/server.log" >&2; exit 1; }
    sleep 0.1
done
[[ -s "$OUT/server.port" ]] || { echo "the coordinator did not start listening" >&2; exit 1; }
TARGET="$COORDINATOR:$(cat "$OUT/server.port")"

# 4. The proxy (when asked for), then one member per namespace.
if [[ -n "${LATENCY_MS:-}${DROP:-}${CUT_AFTER:-}" ]]; then
    PROXY_ARGS=(--listen "$COORDINATOR:0" --target "$TARGET" --latency-ms "${LATENCY_MS:-0}"
                --drop "${DROP:-0}" --port-file "$OUT/proxy.port" --stats-file "$OUT/proxy.json")
    [[ -n "${CUT_AFTER:-}" ]] && PROXY_ARGS+=(--cut-after "$CUT_AFTER" --cut-direction down)
    echo "+ ip netns exec $HUB $PYTHON tests/netns/netns_proxy.py ${PROXY_ARGS[*]}"
    ip netns exec "$HUB" "$PYTHON" "$ROOT/tests/netns/netns_proxy.py" "${PROXY_ARGS[@]}" \
        > "$OUT/logs/proxy.log" 2>&1 &
    PIDS+=("$!")
    for _ in $(seq 300); do [[ -s "$OUT/proxy.port" ]] && break; sleep 0.1; done
    [[ -s "$OUT/proxy.port" ]] || { echo "the proxy did not start" >&2; exit 1; }
    TARGET="$COORDINATOR:$(cat "$OUT/proxy.port")"
fi
CLIENTS=()
for i in "${!MEMBERS[@]}"; do
    name="${MEMBERS[$i]}"
    own="$OUT/orgs/$name"
    args=(client "$CONFIG" --name "$name" --data "$own/data.npz" --pki "$own" --server "$TARGET")
    echo "+ ip netns exec $P-m$i $PYTHON -m veil.cli ${args[*]}"
    ip netns exec "$P-m$i" "$PYTHON" -m veil.cli "${args[@]}" > "$OUT/logs/$name.log" 2>&1 &
    CLIENTS+=("$!")
    PIDS+=("$!")
done

# 5. Wait for the run (each process gives up by itself after its config's timeouts).
status=0
wait "$SERVER" || status=$?
for pid in "${CLIENTS[@]}"; do wait "$pid" || status=$?; done
[[ -f "$OUT/proxy.json" ]] && echo "proxy: $(cat "$OUT/proxy.json")"
if [[ -n "${RATE:-}" ]]; then tc -s -n "$HUB" qdisc show | grep -A1 tbf || true; fi
if [[ $status -ne 0 ]]; then
    echo "a process failed (status $status); logs in $OUT/logs" >&2
    exit "$status"
fi
"$PYTHON" - "$OUT/result.json" <<'EOF'
import json
import sys

result = json.load(open(sys.argv[1]))
for r in result["rounds"]:
    print(f"round {r['round']}: {r['clients']} members, {r['dropped']} dropped, "
          f"{r['duration_s']:.2f} s")
print("final:", result["final"])
EOF
echo "result: $OUT/result.json, logs: $OUT/logs"
