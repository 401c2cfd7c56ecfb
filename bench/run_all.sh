#!/usr/bin/env bash
# Build the benchmark environment from scratch and run every benchmark.
#
# Usage: bench/run_all.sh [--reuse-venv]
#
# Steps:
# 1. Install Debian's etcd-server and etcd-client when missing (needs root).
# 2. Create bench/.venv with py-spy and a regular, non-editable install of
#    this work tree.
# 3. Run the call-cost, call-breakdown, throughput, memory, Slack-overhead
#    and daemon-profile benchmarks.
# 4. Start a Firestore emulator on a free loopback port, run the Firestore
#    benchmark and the status benchmark (SQLite, then Firestore) against
#    it, and stop it by its pid. Without the emulator (gcloud and its
#    cloud-firestore-emulator component) the Firestore benchmark is skipped
#    with a message, and the status benchmark runs on SQLite only.
# 5. Write JSON to bench/results/ and the tables to bench/results/report.md.
#
# --reuse-venv keeps an existing bench/.venv and only reinstalls deployd into it.
# Every daemon and etcd server is started by the Python scripts, which stop
# them by pid on exit. The Firestore emulator is the one background process
# that this script starts itself. It runs in a process group of its own, and
# the EXIT trap stops that group.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
VENV_DIR="$BENCH_DIR/.venv"
REUSE_VENV=0

for argument in "$@"; do
    case "$argument" in
        --reuse-venv) REUSE_VENV=1 ;;
        *)
            echo "run_all.sh: unknown option '$argument'; the only option is --reuse-venv" >&2
            exit 64
            ;;
    esac
done

install_debian_packages() {
    local missing=()
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v etcdctl >/dev/null || missing+=(etcd-client)
    command -v flock >/dev/null || missing+=(util-linux)
    if [ ${#missing[@]} -eq 0 ]; then
        return
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "run_all.sh: missing ${missing[*]}; install them with 'sudo apt-get install ${missing[*]}'" >&2
        exit 69
    fi
    echo "== installing ${missing[*]} from Debian"
    apt-get update -qq
    # NOTE: Debian's etcd-server package enables etcd.service. In containers,
    # policy-rc.d keeps apt from starting it. On a host with systemd, apt starts
    # it on localhost:2379. The benchmark never uses it, because it starts its
    # own etcd on free loopback ports.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
}

# Print the real interpreter behind a pyenv shim, so the venv's python is not a shim.
base_python() {
    python3 -c 'import sys; print(sys.executable)'
}

# Build a wheel from a copy of the work tree, so that the build leaves no
# build/ or *.egg-info directories in the repository that other work shares.
install_deployd() {
    work_dir=$(mktemp -d /tmp/deployd-bench-build.XXXXXX)
    trap 'rm -rf "$work_dir"' EXIT
    mkdir "$work_dir/source" "$work_dir/wheel"
    tar -C "$REPO_DIR" \
        --exclude=./.git --exclude=./.venv --exclude=./bench \
        --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ \
        --exclude=.mypy_cache --exclude=.pytest_cache --exclude=.ruff_cache \
        -cf - . | tar -C "$work_dir/source" -xf -
    "$VENV_DIR/bin/python" -m pip wheel --quiet --no-deps -w "$work_dir/wheel" "$work_dir/source"
    local wheel
    wheel=$(ls "$work_dir"/wheel/deployd-*.whl)
    # The first install brings the dependencies; the second replaces a deployd
    # of the same version left by an earlier run with this work tree's code.
    "$VENV_DIR/bin/python" -m pip install --quiet "$wheel"
    "$VENV_DIR/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
    rm -rf "$work_dir"
    trap - EXIT
}

create_venv() {
    if [ "$REUSE_VENV" -eq 1 ] && [ -x "$VENV_DIR/bin/python" ]; then
        echo "== reusing $VENV_DIR"
    else
        echo "== creating $VENV_DIR"
        rm -rf "$VENV_DIR"
        "$(base_python)" -m venv "$VENV_DIR"
    fi
    echo "== installing deployd (not editable) and py-spy into $VENV_DIR"
    install_deployd
    # py-spy samples the daemon from outside, and the daemon never imports it.
    "$VENV_DIR/bin/python" -m pip install --quiet py-spy
}

# Print why the Firestore emulator cannot run here, or nothing when it can.
emulator_problem() {
    if ! command -v gcloud >/dev/null 2>&1; then
        echo "gcloud is not installed"
    elif ! command -v java >/dev/null 2>&1; then
        echo "java is not installed"
    elif [ ! -d "$(gcloud info --format='value(installation.sdk_root)' 2>/dev/null)/platform/cloud-firestore-emulator" ]; then
        echo "the cloud-firestore-emulator component of gcloud is not installed"
    fi
}

EMULATOR_PID=""

# Start the emulator in a process group of its own on a free loopback port,
# and wait until it responds. Sets EMULATOR_HOST.
start_emulator() {
    local port log
    port=$("$PYTHON" -c 'import benchlib; print(benchlib.free_loopback_port())')
    EMULATOR_HOST="127.0.0.1:$port"
    log="$BENCH_DIR/results/firestore_emulator.log"
    # Job control puts the background job in a process group of its own, whose
    # id is its pid, so stop_emulator can end gcloud, its shell script and Java.
    set -m
    gcloud emulators firestore start --host-port="$EMULATOR_HOST" >"$log" 2>&1 &
    EMULATOR_PID=$!
    set +m
    trap stop_emulator EXIT
    for _ in $(seq 180); do
        if "$PYTHON" -c 'import sys, urllib.request
sys.exit(urllib.request.urlopen("http://" + sys.argv[1] + "/", timeout=1).read().strip() != b"Ok")' \
            "$EMULATOR_HOST" 2>/dev/null; then
            return
        fi
        if ! kill -0 "$EMULATOR_PID" 2>/dev/null; then
            echo "run_all.sh: the Firestore emulator exited at start; see $log" >&2
            exit 69
        fi
        sleep 0.5
    done
    echo "run_all.sh: the Firestore emulator did not respond within 90s; see $log" >&2
    exit 69
}

# Stop the emulator's process group: SIGTERM, then SIGKILL after 15 s.
stop_emulator() {
    if [ -z "$EMULATOR_PID" ]; then
        return
    fi
    kill -TERM -- "-$EMULATOR_PID" 2>/dev/null || true
    for _ in $(seq 30); do
        kill -0 -- "-$EMULATOR_PID" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "-$EMULATOR_PID" 2>/dev/null || true
    wait "$EMULATOR_PID" 2>/dev/null || true
    EMULATOR_PID=""
}

install_debian_packages
create_venv

cd "$BENCH_DIR"
mkdir -p results
PYTHON="$VENV_DIR/bin/python"
echo "== machine"
"$PYTHON" machine.py
echo "== 1. cost of one call"
"$PYTHON" call_cost.py
echo "== 1b. where the time of one call goes"
"$PYTHON" call_breakdown.py
echo "== 2. throughput and fairness"
"$PYTHON" throughput.py
echo "== 3. daemon memory"
"$PYTHON" memory.py
echo "== 4. what Slack notifications add to a call"
"$PYTHON" slack_overhead.py
echo "== daemon profile"
"$PYTHON" profile_daemon.py
echo "== 5. the Firestore store against a read-modify-write transaction"
why=$(emulator_problem)
if [ -z "$why" ]; then
    start_emulator
    "$PYTHON" firestore_bench.py --emulator-host "$EMULATOR_HOST"
    echo "== 6. status with 500 locks and 10,000 deployment records, SQLite and Firestore"
    "$PYTHON" status_bench.py --emulator-host "$EMULATOR_HOST"
    stop_emulator
else
    echo "run_all.sh: skipping the Firestore benchmark: $why" >&2
    echo "== 6. status with 500 locks and 10,000 deployment records, SQLite only"
    "$PYTHON" status_bench.py
fi
echo "== report"
"$PYTHON" report.py
echo "== tables written to $BENCH_DIR/results/report.md"
