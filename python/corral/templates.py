"""Config templates (a service's ``templates:``): Jinja2 in its sandbox, strict.

A template sees, for the instance it is rendered for:

- ``ports``: its ports by name (``{{ ports.http }}``);
- ``instance``: ``id``, ``index`` (the replica), ``service``, ``dir`` (its own directory);
- ``env``: its environment (the spec's ``env`` and ``env_file``, and the ``CORRAL_*``
  contract);
- ``deps``: per dependency, its healthy instances now, each with ``id``, ``host``,
  ``port`` (its first port), ``ports`` and ``address`` (``host:port``)::

      upstream api { {% for i in deps.api %}server {{ i.address }};{% endfor %} }

A name it does not have is an error (``StrictUndefined``), never an empty string; the
sandbox refuses what would reach Python's insides (``__class__``, ``mro``...), and nothing
can be included or imported. Jinja2 is imported only when a spec has templates.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jinja2 import Template

__all__ = ["TemplateError", "render", "sample_context", "write_atomically"]


@dataclass
class TemplateError(ValueError):
    """A template that cannot be read, parsed or rendered: ``line`` is its own line (None
    when it is not known)."""

    source: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.source}{f':{self.line}' if self.line else ''}: {self.message}"


_lock = threading.Lock()
_env: Any = None
_cache: dict[tuple[str, int, int], Template] = {}


def _environment() -> Any:
    global _env
    with _lock:
        if _env is None:
            from jinja2 import StrictUndefined
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            _env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False,
                                                 keep_trailing_newline=True, loader=None)
        return _env


def _template(path: Path, shown: str) -> Template:
    from jinja2 import TemplateSyntaxError

    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        got = _cache.get(key)
        if got is not None:
            return got
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(shown, None, f"cannot read it: {getattr(e, 'strerror', None) or e}") from None
    try:
        t: Template = _environment().from_string(text)
    except TemplateSyntaxError as e:
        raise TemplateError(shown, e.lineno, e.message or "syntax error") from None
    t.name = t.filename = shown
    _cache[key] = t
    return t


def render(path: Path, context: dict[str, Any], shown: str | None = None) -> str:
    """The text of the template at ``path`` for ``context``; :class:`TemplateError` names
    the template's line when it cannot (``shown``: how the error names the file)."""
    from jinja2 import TemplateError as JinjaError

    shown = shown or str(path)
    t = _template(path, shown)
    try:
        return t.render(context)
    except JinjaError as e:
        raise TemplateError(shown, _line_of(e, shown), e.message or type(e).__name__) from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as e:
        raise TemplateError(shown, _line_of(e, shown), f"{type(e).__name__}: {e}") from None


def _line_of(e: BaseException, shown: str) -> int | None:
    """The template line the error was raised at (Jinja2 rewrites the traceback so that a
    template's frames carry its own file name and line)."""
    line = getattr(e, "lineno", None)
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename in (shown, "<template>"):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line if isinstance(line, int) else None


def sample_context(service: str, ports: list[str], env: dict[str, str], deps: list[str],
                   dir: str = "/run/corral/instance") -> dict[str, Any]:
    """What ``validate`` renders a template with: the service's real names, one stand-in
    healthy instance per dependency (an empty set is legal at run time; a loop over it
    renders nothing)."""
    numbers = {p: 20000 + i for i, p in enumerate(ports)}
    return {
        "ports": numbers,
        "instance": {"id": f"{service}-0", "index": 0, "service": service, "dir": dir},
        "env": dict(env),
        "deps": {d: [{"id": f"{d}-0", "host": "127.0.0.1", "port": 21000, "ports": {},
                      "address": "127.0.0.1:21000"}] for d in deps},
    }


def write_atomically(path: Path, text: str, uid: int | None = None, gid: int | None = None) -> bool:
    """Writes ``text`` at ``path`` (0600, owned by ``uid``:``gid`` when given) by a rename,
    so a reader sees the old file or the new one, never half; False when it was already so."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if uid is not None or gid is not None:
            os.chown(tmp, -1 if uid is None else uid, -1 if gid is None else gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True
