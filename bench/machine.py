"""Record the machine and the deployd source in bench/results/machine.json."""

from __future__ import annotations

import json
import subprocess

from benchlib import BENCH_DIR, check_installed_client, machine_info, write_result


def source_state() -> dict[str, object]:
    """Return the work tree's commit and its uncommitted changes to the installed code.

    run_all.sh installs the work tree as it is, so a number can depend on
    changes that no commit contains yet.
    """
    repository = BENCH_DIR.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repository), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout

    changed = git("status", "--porcelain", "--", "client", "daemon", "pyproject.toml")
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "modified": [line[3:] for line in changed.splitlines()],
    }


def main() -> None:
    check_installed_client()
    info = machine_info()
    info["source"] = source_state()
    write_result("machine", info)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
