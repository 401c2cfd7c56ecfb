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
# 4. Write JSON to bench/results/ and the tables to bench/results/report.md.
#
# --reuse-venv keeps an existing bench/.venv and only reinstalls deployd into it.
# Every daemon and etcd server is started by the Python scripts, which stop
# them by pid on exit. This script starts no background process itself.
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
echo "== report"
"$PYTHON" report.py
echo "== tables written to $BENCH_DIR/results/report.md"
