"""Shared parts of the benchmarks: the machine, a private daemon, a local etcd, statistics.

Every script in bench/ runs under the benchmark venv (bench/.venv, a regular
non-editable install of deployd that run_all.sh builds). Each daemon and etcd
server started here gets its own temporary directory, listens on a Unix socket
or on a free loopback port, and is stopped by its pid when its ``with`` block
ends, whatever happened inside it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
VENV_BIN = Path(sys.prefix) / "bin"
VENV_PYTHON = VENV_BIN / "python"
DEPLOYD = VENV_BIN / "deployd"

# Upper bounds on waits for a server to start or stop, in seconds.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


class BenchError(Exception):
    """A benchmark cannot run or produced an invalid measurement."""


def check_installed_client() -> None:
    """Raise BenchError unless deployd_client is a regular install in this venv.

    An editable install puts an import hook in front of every import, which
    slows down startup and would make the measured call dearer than a real one.
    """
    import deployd_client

    location = Path(deployd_client.__file__).resolve()
    site_packages = Path(sys.prefix).resolve() / "lib"
    if site_packages not in location.parents:
        raise BenchError(
            f"deployd_client is imported from {location}, not from this venv's site-packages "
            f"({site_packages}); run the benchmarks through bench/run_all.sh, which installs "
            "deployd into bench/.venv without -e"
        )
    if not DEPLOYD.exists():
        raise BenchError(f"missing deployd command {DEPLOYD}; rerun bench/run_all.sh")


# --- the machine ---


def _first_cpuinfo_value(key: str) -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    return "unknown"


def _memory_total_gib() -> float:
    with open("/proc/meminfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1024 * 1024)
    return float("nan")


def tool_version(command: Sequence[str]) -> str:
    """Return the first line that ``command`` prints, or ``not found``."""
    if shutil.which(command[0]) is None:
        return "not found"
    result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    output = (result.stdout or result.stderr).strip()
    return output.splitlines()[0] if output else "unknown"


def machine_info() -> dict[str, Any]:
    """Return the CPU model, cores, RAM, kernel, Python and the peer tools' versions."""
    return {
        "cpu_model": _first_cpuinfo_value("model name"),
        "cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(_memory_total_gib(), 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "python_executable": str(Path(sys.executable).resolve()),
        "etcd": tool_version(["etcd", "--version"]),
        "etcdctl": tool_version(["etcdctl", "version"]),
        "flock": tool_version(["flock", "--version"]),
        "python_env": {
            name: value for name, value in sorted(os.environ.items()) if name.startswith("PYTHON")
        },
    }


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "unknown")
    except OSError:
        return "unknown"


# --- results and statistics ---


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the ``fraction`` quantile of ``values`` by linear interpolation."""
    if not values:
        raise BenchError("no measurements to summarize")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    weight = position - lower
    return ordered[lower] * (1 - weight) + ordered[upper] * weight


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Return count, min, median, p95, max and mean of ``values``."""
    return {
        "count": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "p95": percentile(values, 0.95),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` to bench/results/NAME.json and return the path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def read_result(name: str) -> dict[str, Any]:
    """Return the data that write_result stored under ``name``."""
    data: dict[str, Any] = json.loads((RESULTS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return data


# --- imports ---


def parse_importtime(stderr: str) -> dict[str, dict[str, int]]:
    """Return {module: {self_us, cumulative_us, depth}} from ``-X importtime`` output."""
    modules: dict[str, dict[str, int]] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:") :].split("|", 2)
        stripped = name.lstrip()
        # One space follows the bar, and each level of nesting adds two more.
        modules[stripped.rstrip()] = {
            "self_us": int(self_us),
            "cumulative_us": int(cumulative_us),
            "depth": (len(name) - len(stripped) - 1) // 2,
        }
    return modules


# --- processes ---


def stop_process(process: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> None:
    """Stop a child by its pid: SIGTERM, then SIGKILL if it outlives ``timeout``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time that process ``pid`` has used, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # After the command name, utime and stime are the 12th and 13th fields.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """Return VmRSS and VmHWM (peak RSS) of process ``pid`` from /proc/PID/status, in KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[name] = int(rest.split()[0])
    return values


def _cpu_ticks_by_process() -> dict[int, tuple[str, int]]:
    ticks: dict[int, tuple[str, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            continue
        name = text[text.find("(") + 1 : text.rfind(")")]
        fields = text.rsplit(")", 1)[1].split()
        ticks[int(entry.name)] = (name, int(fields[11]) + int(fields[12]))
    return ticks


def background_load(seconds: float = 2.0) -> dict[str, Any]:
    """Measure the CPU that other processes use before a benchmark starts.

    Samples every process's CPU time twice, ``seconds`` apart, and returns the
    cores they kept busy in between with the five busiest processes. The
    benchmarks share the machine with whatever else runs on it, so a busy
    machine makes every wall-clock figure larger.
    """
    with open("/proc/loadavg", encoding="ascii") as handle:
        load_average = handle.read().split()[:3]
    before = _cpu_ticks_by_process()
    time.sleep(seconds)
    after = _cpu_ticks_by_process()
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    busy: list[tuple[float, int, str]] = []
    for pid, (name, ticks) in after.items():
        if pid == os.getpid() or pid not in before:
            continue
        used = (ticks - before[pid][1]) / ticks_per_second / seconds
        if used > 0:
            busy.append((used, pid, name))
    busy.sort(reverse=True)
    return {
        "load_average_1_5_15": [float(value) for value in load_average],
        "cores_busy": round(sum(used for used, _, _ in busy), 3),
        "busiest": [
            {"pid": pid, "name": name, "cores": round(used, 3)} for used, pid, name in busy[:5]
        ],
    }


def wait_for(check: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Call ``check`` until it returns a true value. Raise BenchError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def private_tempdir(prefix: str) -> Iterator[Path]:
    """Yield a new 0700 directory under /tmp with a short path, and remove it afterwards.

    A short path keeps socket paths well inside the 108-byte limit of sun_path.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- a deployd daemon of its own ---


@dataclass
class Daemon:
    """A running ``deployd serve`` with its own socket, state directory and config."""

    process: subprocess.Popen[bytes]
    root: Path
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def socket(self) -> str:
        return self.env["DEPLOYD_SOCKET"]

    @property
    def log_file(self) -> Path:
        return self.root / "daemon.log"

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_file.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def daemon_env(root: Path) -> dict[str, str]:
    """Return an environment whose deployd clients and daemon use only ``root``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("DEPLOYD_")}
    env.update(
        DEPLOYD_SOCKET=str(root / "run" / "deployd.sock"),
        DEPLOYD_STATE_DIR=str(root / "state"),
        DEPLOYD_CONFIG=str(root / "config.toml"),
        DEPLOYD_NO_AUTOSTART="1",
    )
    return env


def daemon_responds(socket_path: str) -> bool:
    """Return whether a daemon responds to ``hello`` on ``socket_path``."""
    from deployd_client.protocol import ClientError, Connection

    try:
        with Connection.connect(socket_path, timeout=1.0) as connection:
            connection.request("hello", timeout=2.0)
    except (ClientError, OSError):
        return False
    return True


@contextmanager
def running_daemon(
    config_text: str = "", environment: Mapping[str, str] | None = None
) -> Iterator[Daemon]:
    """Start a daemon in a temporary directory, and stop it by its pid on exit.

    The daemon uses SQLite unless ``config_text`` selects another store.
    ``environment`` adds variables for the daemon and its clients, such as
    FIRESTORE_EMULATOR_HOST.
    """
    with private_tempdir("ddb") as root:
        env = daemon_env(root)
        env.update(environment or {})
        Path(env["DEPLOYD_CONFIG"]).write_text(config_text, encoding="utf-8")
        log_path = root / "daemon.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(DEPLOYD), "serve"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        daemon = Daemon(process, root, env)
        try:
            _wait_for_daemon(daemon)
            yield daemon
        finally:
            stop_process(process)


def _wait_for_daemon(daemon: Daemon) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not daemon_responds(daemon.socket):
        if daemon.process.poll() is not None:
            raise BenchError(
                f"deployd serve exited with code {daemon.process.returncode}:\n{daemon.log_tail()}"
            )
        if time.monotonic() >= deadline:
            raise BenchError(
                f"deployd serve did not respond within {START_TIMEOUT:g}s:\n{daemon.log_tail()}"
            )
        time.sleep(0.05)


# --- a local etcd ---


@dataclass
class Etcd:
    """A single-member etcd listening on loopback only."""

    process: subprocess.Popen[bytes]
    client_url: str


@contextmanager
def running_etcd() -> Iterator[Etcd]:
    """Start Debian's etcd on free loopback ports with a temporary data dir, and stop it by pid."""
    if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
        raise BenchError("etcd or etcdctl is missing; install Debian's etcd-server and etcd-client")
    with private_tempdir("etcdb") as root:
        client_url = f"http://127.0.0.1:{free_loopback_port()}"
        peer_url = f"http://127.0.0.1:{free_loopback_port()}"
        command = [
            "etcd",
            "--name=bench",
            f"--data-dir={root / 'data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=bench={peer_url}",
            "--initial-cluster-state=new",
            "--log-level=error",
        ]
        with open(root / "etcd.log", "wb") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            wait_for(lambda: _etcd_healthy(client_url, process), START_TIMEOUT, "etcd to start")
            yield Etcd(process, client_url)
        finally:
            stop_process(process)


def _etcd_healthy(client_url: str, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise BenchError(f"etcd exited with code {process.returncode} at start")
    # An empty ProxyHandler keeps any *_proxy variable from routing this loopback request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{client_url}/health", timeout=1.0) as response:
            return bool(json.loads(response.read()).get("health") == "true")
    except (OSError, ValueError):
        return False
