"""The service definitions that run ``deployd serve``: systemd user units and a launchd agent.

``deployd service install`` writes these with the path of the installed
``deployd`` filled in. The copies in the repository's ``systemd/`` and
``launchd/`` folders, for people who install the files by hand, are the same
texts rendered for a ``deployd`` in ``~/.local/bin`` (systemd) or
``/usr/local/bin`` (launchd). A test keeps them identical.
"""

SOCKET_UNIT = "deployd.socket"
SERVICE_UNIT = "deployd.service"
LAUNCHD_LABEL = "com.deployd.daemon"

# The socket path of the units, in systemd's specifiers: %t is the user's
# runtime directory, $XDG_RUNTIME_DIR, where the client looks first.
SYSTEMD_SOCKET_PATH = "%t/deployd/deployd.sock"

# The systemd watchdog interval: the daemon pings every half of it.
WATCHDOG_SECONDS = 20

# Exit codes after which systemd does not restart the daemon, because a
# restart cannot help: another daemon serves the socket (75), the socket
# directory is not private (77), the configuration is invalid (78).
NO_RESTART_EXIT_CODES = (75, 77, 78)

_SOCKET_TEMPLATE = """\
[Unit]
Description=deployd socket: deploy locks for this user's deploys

[Socket]
ListenStream={socket_path}
SocketMode=0600
DirectoryMode=0700

[Install]
WantedBy=sockets.target
"""

_SERVICE_TEMPLATE = """\
[Unit]
Description=deployd daemon: deploy locks for this user's deploys
Requires={socket_unit}
After={socket_unit}

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start} serve
ExecReload=kill -HUP $MAINPID
WatchdogSec={watchdog}s
Restart=on-failure
RestartSec=1s
RestartPreventExitStatus={no_restart}
TimeoutStopSec=30s
UMask=0077

[Install]
Also={socket_unit}
"""


def systemd_exec_path(path: str) -> str:
    """Return ``path`` as the first word of an ``ExecStart=`` line.

    systemd expands ``%`` specifiers and ``$`` variables in command lines and
    splits them at spaces, so those are escaped and the word is quoted when
    it needs to be.
    """
    escaped = path.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    if any(char.isspace() for char in path) or escaped != path:
        return f'"{escaped}"'
    return escaped


def systemd_units(exec_start: str) -> dict[str, str]:
    """Return the socket and service unit texts by file name.

    ``exec_start`` is the ``deployd`` command as it goes into ``ExecStart=``,
    already escaped (see ``systemd_exec_path``).
    """
    return {
        SOCKET_UNIT: _SOCKET_TEMPLATE.format(socket_path=SYSTEMD_SOCKET_PATH),
        SERVICE_UNIT: _SERVICE_TEMPLATE.format(
            socket_unit=SOCKET_UNIT,
            exec_start=exec_start,
            watchdog=WATCHDOG_SECONDS,
            no_restart=" ".join(str(code) for code in NO_RESTART_EXIT_CODES),
        ),
    }


def launchd_agent(program: list[str], log_dir: str) -> dict[str, object]:
    """Return the launch agent's property list as a dict, for ``plistlib``.

    ``program`` is the ``deployd`` command as absolute paths (launchd does
    not expand ``~``). launchd restarts the daemon after a crash but not
    after a clean exit (``KeepAlive`` with ``SuccessfulExit`` false), and
    starts it when the agent is loaded, at login.
    """
    log_file = f"{log_dir.rstrip('/')}/deployd.log"
    return {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": [*program, "serve"],
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ProcessType": "Background",
        # Seconds between two starts, so a daemon that fails at once is not restarted in a loop.
        "ThrottleInterval": 10,
        # Seconds from SIGTERM to SIGKILL at stop; the daemon usually stops within a few.
        "ExitTimeOut": 30,
        "StandardOutPath": log_file,
        "StandardErrorPath": log_file,
    }
