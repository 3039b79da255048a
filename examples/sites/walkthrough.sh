#!/usr/bin/env bash
# Long-lived sites on one machine (docs/sites.md): a CA operator, a coordinator, three banks
# and a data scientist (the submitter), each in its own folder under a temporary directory, as
# five parties on four machines would be. Only public files travel between the folders
# (ca.crt, crl.pem, certificates); every private key stays in the folder it was made in.
#
#   bash examples/sites/walkthrough.sh              # about two minutes
#   VEIL=".venv/bin/veil" bash examples/sites/walkthrough.sh
#   KEEP=1 bash examples/sites/walkthrough.sh       # keep the folders to look at afterwards
#
# It sets up the PKI, writes the banks' CSV files, sets each bank's privacy budget, starts the
# coordinator and three sites on 127.0.0.1, submits a plain job and a SecAgg + DP job, waits for
# both, shows each bank's `veil site status`, submits a job that bank C's policy refuses, and
# stops everything (also on failure or Ctrl-C).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

# `veil` from PATH; else this checkout's virtual environment; else `python -m veil.cli`.
if [[ -z "${VEIL:-}" ]]; then
    if command -v veil >/dev/null; then VEIL=veil
    elif [[ -x "$REPO/.venv/bin/veil" ]]; then VEIL="$REPO/.venv/bin/veil"
    else VEIL="python3 -m veil.cli"; fi
fi
read -ra VEIL_CMD <<<"$VEIL"
veil() { "${VEIL_CMD[@]}" "$@"; }
# Long-running processes are started as "${VEIL_CMD[@]}" ... &, not through the function, so
# that $! is veil's own process id (a function in the background runs in a subshell, and
# killing the subshell would leave veil running).
# The Python that runs make_files.py (it needs pandas and dalex): the one next to veil's.
PYTHON="${PYTHON:-$(dirname "$(command -v "${VEIL_CMD[0]}")")/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3

WORK="$(mktemp -d "${TMPDIR:-/tmp}/veil-sites.XXXXXX")"
PIDS=()
stop_all() {
    local code=$?
    # SIGTERM: a site stops its members, the coordinator kills its job servers; both exit
    # within seconds.
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    [[ ${#PIDS[@]} -gt 0 ]] && echo "stopped the coordinator and the three sites"
    if [[ -n "${KEEP:-}" ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$code"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

say() { printf '\n== %s\n' "$*"; }
BANKS=(bank_a bank_b bank_c)
cd "$WORK"
mkdir -m 700 ca coordinator submitter "${BANKS[@]}"

say "1. The CA operator makes the federation's CA (ca.key never leaves ca/)"
veil pki init ca/pki --name "three-banks CA" >/dev/null
ls ca/pki

say "2. Every party makes its own keys and a certificate request, in its own folder"
veil pki request coordinator/pki server --role server >/dev/null
for bank in "${BANKS[@]}"; do veil pki request "$bank/pki" "$bank" --role client >/dev/null; done
veil pki request submitter/pki analyst --role submitter >/dev/null
ls bank_a/pki/nodes/bank_a

say "3. The requests travel to the CA, which signs them; certificates travel back"
mkdir -p ca/requests ca/issued
cp coordinator/pki/nodes/server/request.csr ca/requests/server.csr
cp submitter/pki/nodes/analyst/request.csr ca/requests/analyst.csr
for bank in "${BANKS[@]}"; do cp "$bank/pki/nodes/$bank/request.csr" "ca/requests/$bank.csr"; done
for name in server analyst "${BANKS[@]}"; do
    veil pki sign ca/pki "ca/requests/$name.csr" --out "ca/issued/$name.crt"
done
# Back to each owner: its certificate, the CA's certificate, the signed revocation list.
for party in coordinator:server submitter:analyst bank_a:bank_a bank_b:bank_b bank_c:bank_c; do
    folder="${party%%:*}" name="${party##*:}"
    cp "ca/issued/$name.crt" "$folder/pki/nodes/$name/node.crt"
    cp ca/pki/ca.crt ca/pki/crl.pem "$folder/pki/"
done
# The coordinator files each bank's public certificate under its own nodes/NAME/.
for bank in "${BANKS[@]}"; do
    mkdir -p "coordinator/pki/nodes/$bank"
    cp "ca/issued/$bank.crt" "coordinator/pki/nodes/$bank/node.crt"
done
find coordinator/pki -name '*.crt' | sort

say "4. Each bank's data: its own CSV file (make_files.py), in its own data folder"
mkdir -p source
cp "$REPO/examples/three_banks/make_files.py" source/
"$PYTHON" source/make_files.py >/dev/null
for bank in "${BANKS[@]}"; do
    mkdir -m 700 "$bank/data" "$bank/home"
    cp "source/$bank.csv" "$bank/data/"
    cp "$HERE/policy_$bank.toml" "$bank/policy.toml"
    wc -l "$bank/data/$bank.csv"
done

say "5. Each bank's data owner sets the budget of its file in the site's own ledger"
for bank in "${BANKS[@]}"; do
    veil budget set "$bank.csv" --epsilon 10 --delta 1e-4 --ledger "$bank/home/ledger.db"
done

say "6. The coordinator starts (control service on 127.0.0.1, a free port)"
PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
COORDINATOR="127.0.0.1:$PORT"
"${VEIL_CMD[@]}" coordinator start --home coordinator/home --pki coordinator/pki --address "$COORDINATOR" \
    --port-file coordinator/port --log-file coordinator/coordinator.log 2>coordinator/stderr.log &
PIDS+=($!)
for _ in $(seq 120); do [[ -s coordinator/port ]] && break; sleep 0.5; done
[[ -s coordinator/port ]] || { cat coordinator/stderr.log; exit 1; }
echo "coordinator listening on $COORDINATOR"

say "7. Each bank starts its site: its keys, its data folder, its policy, its own state"
for bank in "${BANKS[@]}"; do
    "${VEIL_CMD[@]}" site start --pki "$bank/pki" --data-dir "$bank/data" --policy "$bank/policy.toml" \
        --coordinator "$COORDINATOR" --home "$bank/home" --log-file "$bank/site.log" \
        2>"$bank/stderr.log" &
    PIDS+=($!)
done

say "8. The analyst submits two jobs (config and schema travel signed)"
cp "$HERE/job_plain.toml" "$HERE/job_secagg_dp.toml" submitter/
cp "$REPO/examples/three_banks/schema.toml" submitter/
export VEIL_COORDINATOR="$COORDINATOR" VEIL_PKI="$WORK/submitter/pki"

job_id() { "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["job_id"])'; }
state_of() {
    # `veil job status` exits 4 for a failed or refused job; its JSON says which.
    { veil job status "$1" --json || true; } | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["state"])'
}
wait_for() {  # wait until job $1 is in a final state (at most 300 s)
    local state
    for _ in $(seq 150); do
        state="$(state_of "$1")"
        case "$state" in finished | failed | refused | cancelled) return 0 ;; esac
        sleep 2
    done
    echo "job $1 still $state after 300 s" >&2
    return 1
}

PLAIN="$(veil job submit submitter/job_plain.toml --json | job_id)"
echo "submitted job_plain.toml: job $PLAIN"
wait_for "$PLAIN"
veil job status "$PLAIN"

DP="$(veil job submit submitter/job_secagg_dp.toml --json | job_id)"
echo "submitted job_secagg_dp.toml: job $DP"
wait_for "$DP"
veil job status "$DP"
veil job logs "$DP" --tail 2     # the job's events, then its server's last log lines

say "9. Each bank's own view: veil site status (and its ledger)"
for bank in "${BANKS[@]}"; do veil site status --home "$bank/home"; done
veil budget show --ledger bank_a/home/ledger.db

say "10. A job that bank C's policy refuses: 15 rounds, rounds of two banks"
sed -e 's/^rounds = 5/rounds = 15/' -e 's/^min_clients = 3 .*/min_clients = 2/' \
    -e '1,/^name = /s/^name = .*/name = "three-banks-long"/' \
    submitter/job_plain.toml >submitter/job_long.toml
grep -E '^(name|rounds|min_clients) =' submitter/job_long.toml
LONG="$(veil job submit submitter/job_long.toml --json | job_id)"
echo "submitted job_long.toml: job $LONG"
wait_for "$LONG"
veil job status "$LONG" || true   # exits 4: the job was refused
veil job list

say "11. Stopping the coordinator and the sites"
