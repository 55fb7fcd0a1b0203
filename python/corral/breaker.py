"""The circuit breaker's Python face: the native breaker plus async calls and the decorator."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
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
    the guarded call runs, so threads never serialize on the breaker. Each call's outcome
    counts in the state and generation it was admitted in (its ticket), so a call admitted
    while closed that ends during half-open changes nothing there.

    On a generator function (sync or async), the call is the whole iteration: admitted
    when it starts, a failure if the generator raises, a success when it is exhausted,
    neither when the consumer closes it early.
    """

    async def call_async(
        self, f: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Awaits ``f(*args, **kwargs)`` under the breaker; raises ``CircuitOpenError`` when open."""
        ticket = self.admit()
        start = time.perf_counter() if self.timed else 0.0
        try:
            result = await f(*args, **kwargs)
        except BaseException as exc:
            self.record_exception(exc, self._since(start), ticket=ticket)
            raise
        self.record_success(self._since(start), ticket=ticket)
        return result

    def _since(self, start: float) -> float | None:
        return time.perf_counter() - start if self.timed else None

    def _generator(self, fn: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Generator[Any, Any, Any]]:
        @functools.wraps(fn)
        def guarded_gen(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
            ticket = self.admit()
            start = time.perf_counter() if self.timed else 0.0
            try:
                result = yield from fn(*args, **kwargs)
            except BaseException as exc:  # GeneratorExit (closed early) counts as neither
                self.record_exception(exc, self._since(start), ticket=ticket)
                raise
            self.record_success(self._since(start), ticket=ticket)
            return result

        return guarded_gen

    def _async_generator(self, fn: Callable[..., AsyncGenerator[Any, Any]]) -> Callable[..., AsyncGenerator[Any, Any]]:
        @functools.wraps(fn)
        async def guarded_agen(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
            ticket = self.admit()
            start = time.perf_counter() if self.timed else 0.0
            agen = fn(*args, **kwargs)
            try:
                item = await agen.asend(None)
                while True:
                    try:
                        sent = yield item
                    except GeneratorExit:
                        await agen.aclose()
                        raise
                    except BaseException as thrown:
                        item = await agen.athrow(thrown)
                    else:
                        item = await agen.asend(sent)
            except StopAsyncIteration:
                self.record_success(self._since(start), ticket=ticket)
            except BaseException as exc:
                self.record_exception(exc, self._since(start), ticket=ticket)
                raise

        return guarded_agen

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorates a sync or async function (or generator function) so that every call goes
        through the breaker."""
        if inspect.isasyncgenfunction(fn):
            return cast(Callable[P, Any], self._async_generator(fn))
        if inspect.isgeneratorfunction(fn):
            return cast(Callable[P, Any], self._generator(fn))
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.call_async(fn, *args, **kwargs)

            return guarded_async
        guarded = _core.GuardedCall(self, fn)
        functools.update_wrapper(guarded, fn)
        return cast(Callable[P, Any], guarded)
