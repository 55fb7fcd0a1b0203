"""Reading a ``corral.yaml`` safely: the file, its YAML, and the line of every key.

Hardened as YAML loaders that face untrusted input are: only a regular file (a FIFO would
hang), at most :data:`MAX_BYTES`, UTF-8 text without control characters, YAML 1.2's
booleans (only ``true``/``false``), no duplicate keys, no recursive alias, aliases expanding
to at most :data:`MAX_NODES` nodes (a 500-byte "billion laughs" file otherwise takes
gigabytes), and nesting bounded. Every refusal is a :class:`~corral.exceptions.SpecError`
with the file and, where known, the line.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any, TypeAlias

import yaml

from corral.exceptions import SpecError

__all__ = ["MAX_BYTES", "MAX_NODES", "Loc", "Source", "read_document", "read_text"]

MAX_BYTES = 1 << 20
"""Largest spec file read."""
MAX_NODES = 100_000
"""Most YAML nodes a document may expand to, aliases counted each time they are used."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and sequences."""

Loc: TypeAlias = tuple[str | int, ...]


_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser when PyYAML has it: composing a 300-line spec takes a few ms instead of
~50 (the marks, the resolvers and the checks below are the same)."""


class _Loader(_Base):  # type: ignore[misc]
    """SafeLoader with YAML 1.2's booleans: only true and false are booleans. YAML 1.1 (what
    PyYAML implements) also reads yes, no, on and off as booleans, so `policy: no`, the
    spelling the spec documents, became False, and `env: {DEBUG: yes}` was not a string."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class Source:
    """A parsed file with the line of every key, to place errors."""

    def __init__(self, file: str, lines: dict[Loc, int]) -> None:
        self.file = file
        self.lines = lines

    def error(self, loc: Loc, message: str) -> SpecError:
        """A :class:`SpecError` at ``loc`` (pydantic's own location parts are skipped)."""
        clean = [p for p in loc if _is_field(p)]
        line = None
        for n in range(len(clean), -1, -1):
            line = self.lines.get(tuple(clean[:n]))
            if line is not None:
                break
        field = ".".join(str(p) for p in clean) or None
        return SpecError(message, self.file, line, field)


_PYDANTIC_TAGS = re.compile(r"^(int|str|float|bool|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*|.*\[.*\])$")


def _is_field(part: str | int) -> bool:
    return isinstance(part, int) or not _PYDANTIC_TAGS.match(part)


def read_text(path: str | Path) -> str:
    """The file's text: a regular file of at most :data:`MAX_BYTES`, valid UTF-8."""
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SpecError("file not found", str(p)) from None
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror}", str(p)) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise SpecError(f"cannot read: {kind}", str(p))
        if st.st_size > MAX_BYTES:
            raise SpecError(f"file too large ({st.st_size} bytes; a spec is at most {MAX_BYTES})", str(p))
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise SpecError(f"file too large (a spec is at most {MAX_BYTES} bytes)", str(p))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SpecError(f"not UTF-8 text (byte 0x{data[e.start]:02x})", str(p), line) from None


def read_document(text: str, file: str) -> tuple[Any, Source, list[tuple[Loc, int]]]:
    """The document's data, where each key is, and the duplicate keys (with their lines)."""
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            lines: dict[Loc, int] = {}
            dups: list[tuple[Loc, int]] = []
            if node is not None:
                _bound(node, file)
                _walk(node, (), lines, dups)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else None
        problem = str(e.problem or e)
        if "maximum nesting depth" in problem:  # libyaml's own limit, deeper than ours
            problem = f"nested deeper than {MAX_DEPTH} levels"
        raise SpecError(f"invalid YAML: {problem}", file, line) from None
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise SpecError(f"invalid character {_char(e.character)} (control characters and NUL are not allowed)",
                        file, line) from None
    except yaml.YAMLError as e:
        raise SpecError(f"invalid YAML: {e}", file) from None
    except RecursionError:
        raise SpecError(f"invalid YAML: nested deeper than {MAX_DEPTH} levels", file) from None
    return data, Source(file, lines), dups


def _char(c: object) -> str:
    if isinstance(c, int):
        return f"U+{c:04X}"
    return repr(c)


def _bound(root: yaml.Node, file: str) -> None:
    """Refuses recursive aliases, nesting past :data:`MAX_DEPTH` and documents that expand to
    more than :data:`MAX_NODES` nodes, without expanding anything (sizes are memoised per
    node, so shared subtrees are counted once per use at the cost of one visit)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        kids = _children(node)
        if done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_NODES:
                raise SpecError(f"aliases expand to more than {MAX_NODES} nodes; refusing to load", file,
                                node.start_mark.line + 1)
            if depth[key] > MAX_DEPTH:
                raise SpecError(f"nested deeper than {MAX_DEPTH} levels", file, node.start_mark.line + 1)
            continue
        if key in size:
            continue
        if key in open_:
            raise SpecError("recursive alias (a node contains itself)", file, node.start_mark.line + 1)
        open_.add(key)
        stack.append((node, True))
        for k in kids:
            if id(k) in open_:
                raise SpecError("recursive alias (a node contains itself)", file, k.start_mark.line + 1)
            if id(k) not in size:
                stack.append((k, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _walk(node: yaml.Node, path: Loc, lines: dict[Loc, int], dups: list[tuple[Loc, int]]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            if key in seen:
                dups.append(((*path, key), k.start_mark.line + 1))
            seen.add(key)
            lines[(*path, key)] = k.start_mark.line + 1
            _walk(v, (*path, key), lines, dups)
            # Keep the key's own line for the key path: values of block mappings start below.
            lines[(*path, key)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), lines, dups)
