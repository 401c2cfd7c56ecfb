"""Command-line parsing for ``deployd``, without argparse.

argparse and what it imports take longer to load than a whole client call,
so the command uses this small parser. Each subcommand is described once,
as a Command with its positionals and Options; the same description drives
parsing and the ``--help`` text.

Rules: ``--name value`` and ``--name=value`` both work, and a value is taken
word for word even when it starts with ``-`` (``--reason -rollback``).
``--`` ends the options; only ``run`` takes a command after it.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any


class UsageError(Exception):
    """The command line is invalid; the message says what and where to look."""


class Option:
    """One option: its flags, where its value goes, and how to read the value.

    An option without ``convert`` is a flag (True when given). ``choices``
    limits the accepted values. ``metavar`` names the value in help text.
    """

    def __init__(
        self,
        flags: Sequence[str],
        help: str,
        dest: str | None = None,
        metavar: str | None = None,
        convert: Callable[[str], Any] | None = None,
        choices: Sequence[str] | None = None,
        default: Any = None,
    ) -> None:
        self.flags = tuple(flags)
        self.help = help
        self.dest = dest or self.flags[0].lstrip("-").replace("-", "_")
        self.metavar = metavar
        self.convert = convert
        self.choices = tuple(choices) if choices else None
        self.default = False if convert is None and default is None else default

    @property
    def takes_value(self) -> bool:
        """Return whether the option is followed by a value."""
        return self.convert is not None

    def read(self, text: str, command: str) -> Any:
        """Convert the option's value, raising UsageError that names the option."""
        assert self.convert is not None
        if self.choices and text not in self.choices:
            raise UsageError(
                f"{self.flags[0]} must be one of {', '.join(self.choices)}, got {text!r} "
                f"(see 'deployd {command} --help')"
            )
        try:
            return self.convert(text)
        except ValueError as exc:
            raise UsageError(f"{self.flags[0]}: {exc} (see 'deployd {command} --help')") from None


class Positional:
    """A positional argument."""

    def __init__(self, dest: str, metavar: str, help: str, required: bool = True) -> None:
        self.dest = dest
        self.metavar = metavar
        self.help = help
        self.required = required


class Command:
    """A subcommand: name, one-line summary, positionals, options."""

    def __init__(
        self,
        name: str,
        summary: str,
        positionals: Sequence[Positional] = (),
        options: Sequence[Option] = (),
        usage: str | None = None,
        takes_command: bool = False,
    ) -> None:
        self.name = name
        self.summary = summary
        self.positionals = tuple(positionals)
        self.options = tuple(options)
        self.takes_command = takes_command
        self.usage = usage or self._default_usage()
        self._by_flag = {flag: option for option in self.options for flag in option.flags}

    def _default_usage(self) -> str:
        words = [f"deployd {self.name}"]
        for positional in self.positionals:
            words.append(positional.metavar if positional.required else f"[{positional.metavar}]")
        if self.options:
            words.append("[options]")
        return " ".join(words)

    def help_text(self) -> str:
        """Return the ``--help`` text, wrapped to 79 columns."""
        import textwrap  # only here: help is rare and textwrap imports re

        rows: list[tuple[str, str]] = [
            (positional.metavar, positional.help) for positional in self.positionals
        ]
        option_rows = [
            (
                ", ".join(option.flags) + (f" {option.metavar}" if option.metavar else ""),
                option.help,
            )
            for option in self.options
        ]
        option_rows.append(("-h, --help", "show this help and exit"))
        width = max(len(name) for name, _ in rows + option_rows) + 2

        def entry(name: str, text: str) -> str:
            return textwrap.fill(
                text,
                width=79,
                initial_indent=f"  {name.ljust(width)}",
                subsequent_indent=" " * (width + 2),
            )

        lines = [f"usage: {self.usage}", "", self.summary]
        if rows:
            lines += ["", "arguments:"] + [entry(name, text) for name, text in rows]
        lines += ["", "options:"] + [entry(name, text) for name, text in option_rows]
        return "\n".join(lines) + "\n"

    def parse(self, argv: Sequence[str]) -> Arguments:
        """Parse the arguments after the subcommand's name."""
        values: dict[str, Any] = {option.dest: option.default for option in self.options}
        values.update({positional.dest: None for positional in self.positionals})
        values["command"] = self.name
        values["help"] = False
        positionals = list(self.positionals)
        trailing: list[str] = []
        index = 0
        while index < len(argv):
            token = argv[index]
            index += 1
            if token == "--":
                trailing = list(argv[index:])
                break
            if token in ("-h", "--help"):
                values["help"] = True
                continue
            if token.startswith("-") and token != "-":
                name, has_value, value = token.partition("=")
                option = self._by_flag.get(name)
                if option is None:
                    raise UsageError(f"unknown option {name} (see 'deployd {self.name} --help')")
                if not option.takes_value:
                    if has_value:
                        raise UsageError(
                            f"{name} takes no value (see 'deployd {self.name} --help')"
                        )
                    values[option.dest] = True
                    continue
                if not has_value:
                    if index >= len(argv):
                        raise UsageError(f"{name} needs a value: {name} {option.metavar}")
                    value = argv[index]
                    index += 1
                values[option.dest] = option.read(value, self.name)
                continue
            if not positionals:
                hint = " (put the command after '--')" if self.takes_command else ""
                raise UsageError(
                    f"unexpected argument {token!r}{hint} (see 'deployd {self.name} --help')"
                )
            values[positionals.pop(0).dest] = token
        if values["help"]:
            return Arguments(values, trailing)
        missing = [positional.metavar for positional in positionals if positional.required]
        if missing:
            raise UsageError(f"missing {missing[0]} (usage: {self.usage})")
        if trailing and not self.takes_command:
            raise UsageError(
                f"'--' and a command only go with 'deployd run', not with '{self.name}'"
            )
        return Arguments(values, trailing)


class Arguments:
    """Parsed arguments, as attributes; ``argv`` holds what came after ``--``."""

    def __init__(self, values: dict[str, Any], argv: list[str]) -> None:
        self.__dict__.update(values)
        self.argv = argv

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"no argument {name!r}")


def top_level_help(commands: Sequence[Command], version: str) -> str:
    """Return the help text of ``deployd`` itself."""
    width = max(len(command.name) for command in commands) + 2
    lines = [
        "usage: deployd COMMAND [options]",
        "",
        f"deployd {version}: coordinate deploys, one holder per lock, others wait their turn.",
        "",
        "commands:",
    ]
    lines += [f"  {command.name.ljust(width)}{command.summary}" for command in commands]
    lines += ["", "Run 'deployd COMMAND --help' for a command's options."]
    return "\n".join(lines) + "\n"
