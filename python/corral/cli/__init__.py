"""The ``corral`` command line: typer and rich over :class:`~corral.agent.client.AgentClient`
(status, events, logs, restart, down) and the engine (validate, plan, a foreground up), one
module per group of commands: :mod:`~corral.cli.deploy`, :mod:`~corral.cli.views`,
:mod:`~corral.cli.change`, :mod:`~corral.cli.machine`, :mod:`~corral.cli.audit`.

Exit codes come from the exception classes (``CorralError.exit_code``): 0 success; 1 the
deployment failed (and was rolled back) or nothing answered; 2 an invalid spec, name or
usage; 77 an operation the caller's role does not allow (``AccessDenied``).
Errors are one line each (``file:line: field: message`` for specs), never a traceback.
"""

from __future__ import annotations

import os

from corral.cli import audit, change, deploy, machine, views
from corral.cli.common import app, error
from corral.exceptions import CorralError, SpecError

__all__ = ["app", "main"]

_COMMANDS = (deploy, views, change, machine, audit)
"""Imported for the commands they register, in the order ``--help`` lists them."""


def main() -> None:
    """Entry point: errors are one line (``CORRAL_DEBUG=1`` shows the traceback of a bug)."""
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except SpecError as e:
        for one in e.all:
            error(one)
        raise SystemExit(e.exit_code) from None
    except CorralError as e:
        if os.environ.get("CORRAL_DEBUG"):
            raise
        error(e)
        raise SystemExit(e.exit_code) from None
    except OSError as e:
        if os.environ.get("CORRAL_DEBUG"):
            raise
        error(e)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
