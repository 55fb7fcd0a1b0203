"""``@retry``: sync (native loop) and async (asyncio) retries driven by a :class:`RetryPolicy`."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, cast, overload

import corral._core as _core

__all__ = ["retry"]

P = ParamSpec("P")
R = TypeVar("R")

ExcTypes = type[BaseException] | tuple[type[BaseException], ...]


class _Decorator:
    """What ``retry(...)`` returns: applies the policy to a sync or async function."""

    def __init__(
        self,
        policy: _core.RetryPolicy,
        on: tuple[type[BaseException], ...],
        retry_if_result: Callable[[Any], bool] | None,
        budget: _core.RetryBudget | None,
    ) -> None:
        self.policy = policy
        self.on = on
        self.retry_if_result = retry_if_result
        self.budget = budget

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        if inspect.iscoroutinefunction(fn):
            return self._wrap_async(fn)
        wrapper = _core.Retrying(fn, self.policy, self.on, self.retry_if_result, self.budget)
        functools.update_wrapper(wrapper, fn)
        return cast(Callable[P, Any], wrapper)

    def _wrap_async(self, fn: Callable[P, Awaitable[Any]]) -> Callable[P, Awaitable[Any]]:
        policy, on, pred, budget = self.policy, self.on, self.retry_if_result, self.budget

        @functools.wraps(fn)
        async def retrying(*args: P.args, **kwargs: P.kwargs) -> Any:
            # The same stepper as the native sync loop: budget, elapsed time, attempt count.
            attempts = policy.attempts(budget)
            while True:
                error: BaseException | None = None
                try:
                    result = await fn(*args, **kwargs)
                except on as exc:
                    error = exc
                    result = None
                else:
                    if pred is None or not pred(result):
                        return result
                delay = attempts.after_failure()
                if delay is None:
                    if error is not None:
                        raise error
                    raise attempts.exhausted(result)
                if delay > 0:
                    await asyncio.sleep(delay)

        return retrying


def retry(
    policy: _core.RetryPolicy | None = None,
    *,
    on: ExcTypes = Exception,
    retry_if_result: Callable[[Any], bool] | None = None,
    budget: _core.RetryBudget | None = None,
) -> _Decorator:
    """Retries a sync or async function by ``policy`` (default: exponential from 0.1 s, 3 attempts).

    - ``on``: exception classes that are retried; anything else propagates at once.
    - ``retry_if_result``: a predicate on the return value; True asks for another attempt, and
      ``RetryExhausted`` is raised when none is left.
    - ``budget``: a shared :class:`RetryBudget`; when it is spent, the error propagates instead of a retry.

    When attempts run out on an exception, that exception propagates unchanged.
    """
    if policy is None:
        policy = _core.RetryPolicy.exponential(0.1)
    on_tuple = on if isinstance(on, tuple) else (on,)
    for cls in on_tuple:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"on must be exception classes, got {cls!r}")
    return _Decorator(policy, on_tuple, retry_if_result, budget)
