"""The circuit breaker's Python face: the native breaker plus async calls and the decorator."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, cast, overload

import corral._core as _core

__all__ = ["CircuitBreaker"]

P = ParamSpec("P")
R = TypeVar("R")


class CircuitBreaker(_core.CircuitBreaker):
    """A thread-safe circuit breaker (states ``closed``, ``open``, ``half_open``, ``forced_open``,
    ``disabled``), usable as ``breaker.call(f, ...)``, ``await breaker.call_async(f, ...)``,
    ``@breaker`` on sync and async functions, and ``with breaker:``.

    The state check and the bookkeeping are native and lock-free; no lock is held while
    the guarded call runs, so threads never serialize on the breaker.
    """

    async def call_async(
        self, f: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Awaits ``f(*args, **kwargs)`` under the breaker; raises ``CircuitOpenError`` when open."""
        self.check()
        start = time.perf_counter() if self.timed else 0.0
        try:
            result = await f(*args, **kwargs)
        except BaseException as exc:
            self.record_exception(exc, time.perf_counter() - start if self.timed else None)
            raise
        self.record_success(time.perf_counter() - start if self.timed else None)
        return result

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorates a sync or async function so that every call goes through the breaker."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.call_async(fn, *args, **kwargs)

            return guarded_async
        guarded = _core.GuardedCall(self, fn)
        functools.update_wrapper(guarded, fn)
        return cast(Callable[P, Any], guarded)
