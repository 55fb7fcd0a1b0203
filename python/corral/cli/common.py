"""What every command of the CLI shares: the typer app, the two consoles, the options, and
how errors and user text are printed (literally, never as markup)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from corral.agent.client import AgentClient, default_state_dir
from corral.exceptions import SpecError
from corral.terminal import printable as printable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from corral.agent.client import EventRow
    from corral.engine import Deployment
    from corral.spec import DeploymentSpec


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Orchestrate services on one machine: placement, health, restarts, discovery.")
class _LazyConsole:
    """A rich console created on first use: `up -d` forks its agent before anything is
    printed, and the agent never needs rich, so its import stays off that path."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def get(self) -> Console:
        """The console itself."""
        if self._console is None:
            from rich.console import Console

            # Lines are never wrapped: logs and error messages are read by scripts and grep too.
            self._console = Console(stderr=self._stderr, highlight=False, soft_wrap=True)
        return self._console

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.get().print(*objects, **kwargs)

    def print_json(self, text: str) -> None:
        self.get().print_json(text)

    @property
    def is_terminal(self) -> bool:
        return self.get().is_terminal


out = _LazyConsole(stderr=False)
err = _LazyConsole(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="The spec file.", show_default=True)]
StateOpt = Annotated[Path | None, typer.Option("--state-dir", help="State directory (default: .corral/ beside the "
                                                                    "spec, or $CORRAL_STATE_DIR).")]
SpecFileOpt = Annotated[Path, typer.Option("-f", "--file", help="The spec file (after several service names, "
                                                                 "the spec is an option).")]
DEFAULT_SPEC = Path("corral.yaml")
SpecFileOpt0 = Annotated[Path | None, typer.Option("-f", "--file", help="The spec file (default: ./corral.yaml, or "
                                                                         "the first argument when it is a file).")]


def spec_and_services(args: list[str] | None, spec_file: Path | None) -> tuple[Path, list[str]]:
    """``[SPEC] [SERVICE...]``: the first argument is the spec when it names a file (or ends
    in ``.yaml``/``.yml``) and no ``-f`` was given; the rest are services."""
    args = list(args or [])
    if spec_file is not None:
        return spec_file, args
    if args and (args[0].endswith((".yaml", ".yml")) or "/" in args[0] or Path(args[0]).is_file()):
        return Path(args[0]), args[1:]
    return DEFAULT_SPEC, args


def error(message: object) -> None:
    """``error: <message>``, the message printed literally (never as markup)."""
    from rich.text import Text

    err.print(Text.assemble(("error: ", "red"), printable(message)), soft_wrap=True)


def fail(message: str, code: int) -> NoReturn:
    error(message)
    raise typer.Exit(code)


def spec_warnings(spec: DeploymentSpec) -> None:
    """``warning: file:line: field: message`` for what the spec allows but is worth a word."""
    from rich.text import Text

    from corral.spec.checks import warnings

    for w in warnings(spec):
        err.print(Text.assemble(("warning: ", "yellow"), printable(w)), soft_wrap=True)


def spec_errors(e: SpecError) -> NoReturn:
    for one in e.all:
        error(one)
    raise typer.Exit(e.exit_code)


def client_of(spec: Path, state_dir: Path | None) -> AgentClient:
    return AgentClient(state_dir_of(spec, state_dir))


def state_dir_of(spec: Path, state_dir: Path | None) -> Path:
    return state_dir if state_dir is not None else default_state_dir(spec)


def deployment_of(spec: Path, state_dir: Path | None) -> Deployment:
    from corral.engine import Deployment

    try:
        return Deployment.from_file(spec, state_dir=state_dir_of(spec, state_dir))
    except SpecError as e:
        spec_errors(e)


_STATE_STYLE = {"healthy": "green", "completed": "cyan", "running": "yellow", "starting": "yellow",
                "unhealthy": "red", "failed": "bold red", "restarting": "magenta", "stopped": "dim"}


def status_table(services: Any) -> Table:
    from rich.table import Table
    from rich.text import Text

    t = Table("instance", "version", "state", "pid", "ports", "cpus", "restarts", "reason", box=None)
    for insts in services:
        for i in insts:
            style = _STATE_STYLE.get(i.state, "")
            cpus = ",".join(map(str, i.cpus)) + (" (excl)" if i.exclusive else "") if i.cpus else "-"
            t.add_row(Text(i.id), f"v{i.version}", Text(i.state, style=style), str(i.pid or "-"),
                      ", ".join(f"{k}={v}" for k, v in i.ports.items()) or "-", cpus, str(i.restarts),
                      Text(printable(i.reason[:60])))
    return t


def print_event(e: EventRow) -> None:
    when = time.strftime("%H:%M:%S", time.localtime(e.at)) + f".{int(e.at * 1000) % 1000:03d}"
    who = e.instance or e.deployment
    change = f"{e.old or '':>10} -> {e.new:<10}" if e.new else " " * 24
    times = f" (x{e.repeats})" if e.repeats > 1 else ""
    out.print(printable(f"{when} {who:<16} {change} {e.reason}{times}"), markup=False)
