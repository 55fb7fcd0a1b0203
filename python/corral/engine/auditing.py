"""The deployment's side of the audit trail: each operation it carries out is recorded once,
with its outcome, for the caller it runs for (the control server's peer, else this
process: the Python API), and counted for ``corral_operations_total``. A part of
:class:`~corral.engine.deployment.Deployment`, handed the trail and the counters."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from corral.access import CALLER, Caller

if TYPE_CHECKING:
    from corral.audit import AuditTrail
    from corral.engine.metrics import Counters
    from corral.spec.deployment import AuditSpec

__all__ = ["Auditor"]


class Auditor:
    """Records operations in ``trail`` and counts them in ``counters``."""

    def __init__(self, trail: AuditTrail, counters: Counters) -> None:
        self.trail = trail
        self.counters = counters

    def follow(self, audit: AuditSpec) -> None:
        """The trail's rotation and syslog as an applied spec's ``audit:`` says now."""
        self.trail.max_size, self.trail.keep, self.trail.syslog = audit.max_size, audit.keep, audit.syslog

    @staticmethod
    def caller() -> Caller:
        """Who the operation under way runs for."""
        return CALLER.get() or Caller.this_process()

    @contextlib.asynccontextmanager
    async def op(self, name: str, args: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Records ``name`` once the block ends: ``ok``, or ``failed`` with the error (which
        is raised on). What the block puts in the dict it is given goes in the record."""
        more: dict[str, Any] = {}
        caller = self.caller()
        try:
            yield more
        except BaseException as e:
            reason = str(e) or type(e).__name__
            self.record(caller, name, args, "failed", reason, **more)
            raise
        self.record(caller, name, args, "ok", "", **more)

    def record(self, caller: Caller, name: str, args: Mapping[str, Any], outcome: str, reason: str = "",
               **more: Any) -> None:
        """One record, counted."""
        self.trail.record(caller, name, args, outcome, reason, **more)
        self.counters.operation(name, outcome)
