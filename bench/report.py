"""Render bench/results/*.json as Markdown tables in bench/results/report.md.

A benchmark whose JSON file is missing is left out of the report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from benchlib import RESULTS_DIR, read_result


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Return the lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
    return [*lines, ""]


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def background_line(data: dict[str, Any]) -> str:
    background = data.get("background")
    if not background:
        return ""
    busiest = ", ".join(
        f"{item['name']} (pid {item['pid']}) {item['cores']:.2f}"
        for item in background["busiest"][:3]
    )
    load = " / ".join(f"{value:.2f}" for value in background["load_average_1_5_15"])
    return (
        f"Other processes before the run: {background['cores_busy']:.2f} cores busy "
        f"(busiest: {busiest}); load average {load}."
    )


def source_text(source: dict[str, Any]) -> str:
    modified = ", ".join(source["modified"]) or "none"
    return f"commit {source['commit'][:12]}; uncommitted changes in: {modified}"


def machine_section(machine: dict[str, Any]) -> list[str]:
    rows = [
        ("CPU", machine["cpu_model"]),
        ("cores", machine["cores"]),
        ("RAM", f"{machine['ram_gib']} GiB"),
        ("kernel", machine["kernel"]),
        ("OS", machine["os"]),
        ("Python", f"{machine['python']} ({machine['python_executable']})"),
        ("etcd / etcdctl", f"{machine['etcd']} / {machine['etcdctl']}"),
        ("flock", machine["flock"]),
        ("Python variables", ", ".join(f"{k}={v}" for k, v in machine["python_env"].items())),
        ("deployd source", source_text(machine["source"])),
    ]
    return ["## Machine", "", *table(("what", "value"), rows)]


def call_cost_section(data: dict[str, Any]) -> list[str]:
    settings = data["settings"]
    rows = []
    for name, summary in data["summaries"].items():
        rows.append(
            (
                f"`{name}`",
                f"{summary['median']:.1f}",
                f"{summary['p95']:.1f}",
                f"{data['cpu_ms_median'][name]:.1f}",
                f"{data['ratio_of_deployd_run_to'][name]:.2f}",
                f"{data['median_paired_ratio_of_deployd_run_to'][name]:.2f}",
            )
        )
    lines = [
        "## 1. Cost of one call",
        "",
        f"{settings['repeats']} rounds of {settings['iterations']} interleaved runs per "
        f"command, each after {settings['warmup']} warm-up runs; times in ms, pooled.",
        "",
        *table(
            (
                "command",
                "wall median",
                "wall p95",
                "CPU median",
                "deployd_run / this (medians)",
                "median of paired ratios",
            ),
            rows,
        ),
    ]
    for peer, target in data["targets"].items():
        per_round = ", ".join(
            f"{result['ratio_of_deployd_run_to'][peer]:.2f}x" for result in data["rounds"]
        )
        lines.append(
            f"- target `deployd_run` <= {target['max_ratio']}x `{peer}`: "
            f"{target['ratio']:.2f}x, {verdict(target['met'])} (rounds: {per_round})"
        )
    lines += [
        "- daemon CPU per call that reached it, by round: "
        + ", ".join(
            f"{result['daemon_cpu_ms_per_daemon_call']:.1f} ms" for result in data["rounds"]
        ),
        "",
        background_line(data),
        "",
    ]
    return lines


def breakdown_section(data: dict[str, Any]) -> list[str]:
    imports = data["imports"]
    lines = [
        "## 1b. Where the time of one call goes",
        "",
        f"Daemon CPU while idle: {data['daemon_idle_cpu_share_of_one_core']:.0%} of one core.",
        "",
        f"Imports (median of {imports['runs']} `-X importtime` runs): the bare interpreter "
        f"imports for {imports['bare_interpreter_ms']:.1f} ms.",
        "",
    ]
    rows = []
    for way in ("deployd_command", "python_m_deployd_client"):
        summary = imports[way]
        top = ", ".join(
            f"{entry['module']} {entry['cumulative_ms']:.1f}"
            for entry in summary["top_level_extra_by_cumulative"][:6]
        )
        rows.append(
            (
                way,
                f"{summary['extra_modules_ms']:.1f}",
                summary["extra_module_count"],
                f"{summary['deployd_client_modules_self_ms']:.1f}",
                top,
            )
        )
    lines += table(
        (
            "client started as",
            "ms beyond bare",
            "extra modules",
            "deployd_client self ms",
            "largest top-level imports, cumulative ms",
        ),
        rows,
    )
    lines += [
        "Protocol steps from a Python client, in the order `deployd run` takes them (ms):",
        "",
    ]
    steps = data["round_trips"]["steps_ms"]
    lines += table(
        ("step", "median", "p95"),
        ((name, f"{value['median']:.2f}", f"{value['p95']:.2f}") for name, value in steps.items()),
    )
    busy = data["busy_after_release"]
    lines += [
        f"- daemon CPU per cycle: {data['round_trips']['daemon_cpu_ms_per_cycle']:.2f} ms",
        f"- holds without `wait` rejected right after the same lock's release: "
        f"{busy['rejected']} of {busy['cycles']} {busy['rejected_by_code']}",
        "",
        background_line(data),
        "",
    ]
    return lines


def throughput_section(data: dict[str, Any]) -> list[str]:
    rows = []
    for name, scenario in data["scenarios"].items():
        wait = scenario["wait_ms"]
        fairness = scenario["pairs_per_client"]
        ratio = fairness["max_to_min"]
        rows.append(
            (
                name,
                f"{scenario['clients']}/{scenario['locks']}",
                f"{scenario['pairs_per_second']:.0f}",
                f"{wait['min']:.1f} / {wait['median']:.1f} / {wait['p95']:.1f} / {wait['max']:.1f}",
                f"{fairness['min']} / {fairness['median']:g} / {fairness['max']}",
                f"{ratio:.2f}" if ratio is not None else "n/a (a client got none)",
                f"{fairness['jain_index']:.3f}",
                f"{scenario['daemon_cpu_ms_per_pair']:.2f}",
                scenario["errors"] or "none",
                verdict(scenario["target_met"]),
            )
        )
    settings = data["settings"]
    return [
        "## 2. Throughput and fairness",
        "",
        f"{settings['clients']} client processes, {settings['warmup']:g} s warm-up, "
        f"{settings['duration']:g} s measured; target {data['target_pairs_per_second']} pairs/s.",
        "",
        *table(
            (
                "scenario",
                "clients/locks",
                "pairs/s",
                "wait ms min / median / p95 / max",
                "pairs per client min / median / max",
                "max/min",
                "Jain",
                "daemon CPU ms/pair",
                "errors",
                "target",
            ),
            rows,
        ),
        background_line(data),
        "",
    ]


def memory_section(data: dict[str, Any]) -> list[str]:
    rows = [(phase, f"{value:.1f}") for phase, value in data["rss_mib"].items()]
    return [
        "## 3. Daemon memory",
        "",
        *table(("phase", "VmRSS MiB"), rows),
        f"Peak (VmHWM): {data['peak_rss_mib']:.1f} MiB; target under {data['target_mib']:g} MiB: "
        f"{verdict(data['target_met'])}.",
        "",
    ]


def profile_section(data: dict[str, Any]) -> list[str]:
    idle = data["idle"]
    lines = [
        "## Daemon profile (py-spy)",
        "",
        f"Idle: daemon at {idle['cpu_share_of_one_core']:.0%} of one core with no client; "
        f"{idle['samples']} samples of running code.",
        "",
    ]
    if idle["samples"]:
        lines += table(
            ("cause (innermost deployd module)", "share of samples"),
            ((name, f"{share:.1%}") for name, share in idle["causes"].items()),
        )
    for phase in ("load_lock_per_client", "load_one_lock"):
        load = data[phase]
        rows = [
            (name, f"{share:.1%}", f"{load['ms_per_pair_by_cause'].get(name, 0.0):.2f}")
            for name, share in load["causes"].items()
        ]
        lines += [
            f"`{phase}` ({load['clients']} clients on {load['locks']} locks): "
            f"{load['pairs_per_second']:.0f} pairs/s, daemon at "
            f"{load['cpu_share_of_one_core']:.0%} of one core, "
            f"{load['cpu_ms_per_pair']:.2f} ms CPU per pair.",
            "",
            *table(("cause (innermost deployd module)", "share of samples", "ms per pair"), rows),
        ]
    lines += [background_line(data), ""]
    return lines


def slack_section(data: dict[str, Any]) -> list[str]:
    settings = data["settings"]
    rows = []
    for name, summary in data["summaries"].items():
        target = data["targets"].get(name)
        rows.append(
            (
                f"`{name}`",
                f"{summary['median']:.1f}",
                f"{summary['p95']:.1f}",
                f"{target['ratio']:.3f}" if target else "-",
                f"{target['median_paired_ratio']:.3f}" if target else "-",
            )
        )
    lines = [
        "## 4. What Slack notifications add to a call",
        "",
        f"`deployd run L -- true`, {settings['repeats']} rounds of {settings['iterations']} "
        f"interleaved runs per daemon, each after {settings['warmup']} warm-up runs; times in "
        "ms, pooled.",
        "",
        *table(
            ("daemon", "wall median", "wall p95", "this / slack_off (medians)", "paired ratios"),
            rows,
        ),
    ]
    for name, target in data["targets"].items():
        per_round = ", ".join(f"{result['ratio'][name]:.3f}x" for result in data["rounds"])
        lines.append(
            f"- target `{name}` <= {target['max_ratio']}x `slack_off`: {target['ratio']:.3f}x, "
            f"{verdict(target['met'])} (rounds: {per_round})"
        )
    lines += ["", background_line(data), ""]
    return lines


def firestore_section(data: dict[str, Any]) -> list[str]:
    uncontended = data["uncontended"]
    latency = uncontended["latency_ms"]
    rpcs = uncontended["rpcs_per_acquire"]
    rows = [
        (
            name,
            f"{values['median']:.2f}",
            f"{values['p95']:.2f}",
            f"{rpcs[name]['mean']:.2f} ({', '.join(map(str, rpcs[name]['distinct']))})",
        )
        for name, values in latency.items()
    ]
    contention = data["contention"]
    contention_rows = [
        (
            name,
            ", ".join(
                f"{winners} in {rounds} rounds"
                for winners, rounds in contention[name]["winners_per_round"].items()
            ),
            contention[name]["errors"],
            f"{contention[name]['round_ms']['median']:.0f}",
            f"{contention[name]['round_ms']['p95']:.0f}",
            f"{contention[name]['rpcs_per_round']['median']:.0f}",
        )
        for name in ("daemon", "transaction")
    ]
    acquire = data["end_to_end"]["acquire_ms"]
    lines = [
        "## 5. Firestore store against a read-modify-write transaction",
        "",
        f"(a) Uncontended acquire, {uncontended['iterations']} runs each, ms; "
        f"daemon / transaction (medians) {uncontended['daemon_over_transaction_median']:.2f}x, "
        "daemon in turns / transaction "
        f"{uncontended['daemon_in_turns_over_transaction_median']:.2f}x; "
        f"daemon CPU {uncontended['daemon_cpu_ms_per_acquire_and_release']:.1f} ms per "
        "acquire and release.",
        "",
        *table(("approach", "median", "p95", "RPCs per acquire: mean (distinct)"), rows),
        *_round_trip_lines(uncontended.get("with_round_trip", {})),
        f"(b) {contention['contenders']} contenders per round, {contention['rounds']} rounds "
        "each, through the RPC-counting proxy.",
        "",
        *table(
            (
                "approach",
                "winners per round",
                "errors",
                "round median ms",
                "round p95 ms",
                "RPCs per round",
            ),
            contention_rows,
        ),
        f"(c) `deployd acquire`, {data['end_to_end']['iterations']} runs: "
        f"p50 {acquire['median']:.1f} ms, p95 {acquire['p95']:.1f} ms.",
        "",
    ]
    lines += [f"- target {name}: {verdict(met)}" for name, met in data["targets"].items()]
    lines += ["", background_line(data), ""]
    return lines


SECTIONS = (
    ("machine", machine_section),
    ("call_cost", call_cost_section),
    ("call_breakdown", breakdown_section),
    ("throughput", throughput_section),
    ("memory", memory_section),
    ("slack_overhead", slack_section),
    ("firestore", firestore_section),
    ("daemon_profile", profile_section),
)


def _round_trip_lines(round_trip: dict[str, Any]) -> list[str]:
    """Return the lines of (a) timed again with a round trip added, or none if it was skipped."""
    latency = round_trip.get("latency_ms")
    if not latency:
        return []
    medians = ", ".join(f"{name} {values['median']:.2f}" for name, values in latency.items())
    return [
        f"With {round_trip['added_ms']:g} ms added to each reply, medians in ms: {medians}; "
        f"daemon / transaction {round_trip['daemon_over_transaction_median']:.2f}x, in turns "
        f"{round_trip['daemon_in_turns_over_transaction_median']:.2f}x.",
        "",
    ]


def main() -> None:
    lines = ["# deployd benchmark results", ""]
    for name, render in SECTIONS:
        if (RESULTS_DIR / f"{name}.json").exists():
            lines += render(read_result(name))
    path = RESULTS_DIR / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
