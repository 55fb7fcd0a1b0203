"""Prometheus metrics of a running deployment, in the text exposition format (0.0.4).

Written out here rather than through ``prometheus_client``: the values live in the engine's
own objects and the core's counters, so a scrape is one walk over them (no registry kept in
step with every transition, no import of the client in the agent); the output parses with
``prometheus_client.parser`` (tested).

Families (labels ``service``, ``instance``, and ``probe``, ``upstream``, ``direction``,
``state``, ``result`` where they apply): ``corral_instance_up``, ``corral_instance_state``,
``corral_instance_restarts_total``, ``corral_instance_cpu_seconds_total``,
``corral_instance_memory_rss_bytes``, ``corral_instance_open_fds``,
``corral_probe_duration_seconds`` (histogram), ``corral_probe_failures_total``,
``corral_front_connections_total``,
``corral_front_active_connections``, ``corral_front_bytes_total``,
``corral_front_errors_total``, ``corral_front_ejections_total``,
``corral_front_connect_duration_seconds`` (histogram), ``corral_rollouts_total``,
``corral_operations_total`` (by ``op`` and ``outcome``: ok, failed, refused),
``corral_storage_size_bytes``, ``corral_storage_used_bytes``, ``corral_storage_inodes``,
``corral_storage_measure_seconds`` (the last walk's duration), ``corral_schedule_runs_total``,
``corral_schedule_skipped_total``, ``corral_schedule_missed_total``,
``corral_schedule_next_run_timestamp_seconds``,
and the agent's ``process_*``. CPU time and open descriptors are the instance's process
group's (one pass over ``/proc`` for all instances); memory is its cgroup's when it has one.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from corral._core import CONNECT_BOUNDS, PROBE_BOUNDS, group_usage
from corral.lifecycle import State

if TYPE_CHECKING:
    from corral.engine.frontlink import Front
    from corral.engine.instance import InstanceRuntime
    from corral.engine.stack import Stack

__all__ = ["CONTENT_TYPE", "Counters", "exposition"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TICK = os.sysconf("SC_CLK_TCK")


class Counters:
    """What the engine counts for metrics beside what its objects hold."""

    def __init__(self) -> None:
        self.rollouts: dict[str, int] = {}
        """``result`` (succeeded, reverted, partial) -> rollouts."""
        self.labels: dict[str, _Series] = {}
        """Per instance id: the starts of its lines (built on its first scrape)."""
        self.operations: dict[tuple[str, str], int] = {}
        """``(op, outcome)`` -> operations this process recorded in the audit trail."""

    def rollout(self, result: str) -> None:
        """An apply ended so."""
        self.rollouts[result] = self.rollouts.get(result, 0) + 1

    def operation(self, op: str, outcome: str) -> None:
        """An operation was recorded so."""
        self.operations[op, outcome] = self.operations.get((op, outcome), 0) + 1


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kv.items()) + "}"


def _head(lines: list[str], name: str, kind: str, help: str) -> None:
    lines.append(f"# HELP {name} {help}")
    lines.append(f"# TYPE {name} {kind}")


def _family(lines: list[str], name: str, kind: str, help: str, samples: Iterable[tuple[str, float]]) -> None:
    _head(lines, name, kind, help)
    lines.extend(f"{name}{labels} {value:.17g}" for labels, value in samples)


def _cgroup_memory(inst: InstanceRuntime) -> int | None:
    if inst.cgroup is None:
        return None
    for name in ("memory.current", "memory.usage_in_bytes"):
        try:
            return int((Path(inst.cgroup) / name).read_text())
        except (OSError, ValueError):
            continue
    return None


_STATES = tuple(State)


class _Series:
    """What one instance's lines start with, built on its first scrape and kept: a scrape of
    200 instances writes ~7 000 lines, and building and escaping their labels each time was
    most of its cost."""

    __slots__ = ("base", "lab", "probes", "states")

    def __init__(self, service: str, iid: str) -> None:
        self.base = f'service="{_esc(service)}",instance="{_esc(iid)}"'
        self.lab = f"{{{self.base}}}"
        self.states: dict[State, str] = {}
        """Per current state, the instance's whole ``corral_instance_state`` block."""
        self.probes: dict[str, tuple[list[str], str, str, str, str]] = {}
        """Per probe kind: bucket prefixes, then +Inf, sum, count and failures prefixes."""

    def state_block(self, now: State) -> str:
        block = self.states.get(now)
        if block is None:
            block = self.states[now] = "\n".join(
                f'corral_instance_state{{{self.base},state="{st.value}"}} {1 if st is now else 0}' for st in _STATES)
        return block

    def probe(self, kind: str) -> tuple[list[str], str, str, str, str]:
        got = self.probes.get(kind)
        if got is None:
            b = f'{self.base},probe="{kind}"'
            got = self.probes[kind] = (
                [f'corral_probe_duration_seconds_bucket{{{b},le="{bound}"}} ' for bound in PROBE_BOUNDS],
                f'corral_probe_duration_seconds_bucket{{{b},le="+Inf"}} ',
                f"corral_probe_duration_seconds_sum{{{b}}} ", f"corral_probe_duration_seconds_count{{{b}}} ",
                f"corral_probe_failures_total{{{b}}} ")
        return got


def exposition(stack: Stack, fronts: dict[str, Front], counters: Counters) -> str:
    """The whole scrape."""
    insts = list(stack.instances.values())
    live = [i for i in insts if i.live_process is not None]
    usage = dict(zip((i.id for i in live), group_usage([i.pid or 0 for i in live]), strict=True))
    cache = counters.labels
    rows = []
    for i in insts:
        series = cache.get(i.id)
        if series is None:
            series = cache[i.id] = _Series(i.p.service, i.id)
        rows.append((i, series, i.state, usage.get(i.id)))
    lines: list[str] = []
    add = lines.append

    _head(lines, "corral_instance_up", "gauge", "1 when the instance is healthy.")
    lines += [f"corral_instance_up{s.lab} {1 if st is State.HEALTHY else 0}" for _, s, st, _ in rows]
    _head(lines, "corral_instance_state", "gauge", "1 for the state the instance is in, 0 for the others.")
    lines += [s.state_block(st) for _, s, st, _ in rows]
    _head(lines, "corral_instance_restarts_total", "counter", "Restarts of the instance.")
    lines += [f"corral_instance_restarts_total{s.lab} {i.restarts}" for i, s, _, _ in rows]
    _head(lines, "corral_instance_cpu_seconds_total", "counter",
          "CPU time of the instance's live process tree, seconds.")
    lines += [f"corral_instance_cpu_seconds_total{s.lab} {use[0] / _TICK}" for _, s, _, use in rows if use is not None]
    _head(lines, "corral_instance_memory_rss_bytes", "gauge",
          "Resident memory of the instance: its cgroup's usage when it has one, else its processes' RSS.")
    for i, s, _, use in rows:
        if use is not None:
            m = _cgroup_memory(i)
            add(f"corral_instance_memory_rss_bytes{s.lab} {m if m is not None else use[1]}")
    _head(lines, "corral_instance_open_fds", "gauge", "Open file descriptors of the instance's processes.")
    lines += [f"corral_instance_open_fds{s.lab} {use[2]}" for _, s, _, use in rows if use is not None]
    # Every probe attempt, counted by the core on the probe's task.
    sup = stack.supervisor
    probes = [(s.probe(st[0]), st) for i, s, _, _ in rows for st in (sup.probe_stats(i.id) if sup is not None else [])]
    _head(lines, "corral_probe_duration_seconds", "histogram", "How long each probe attempt took, seconds.")
    for (prefixes, inf, total_p, count_p, _), (_, buckets, total, count, _) in probes:
        lines += [f"{p}{n}" for p, n in zip(prefixes, buckets, strict=True)]
        add(f"{inf}{count}")
        add(f"{total_p}{total}")
        add(f"{count_p}{count}")
    _head(lines, "corral_probe_failures_total", "counter", "Probe attempts that failed.")
    lines += [f"{pre[4]}{st[4]}" for pre, st in probes]
    stats = {name: f.stats() for name, f in sorted(fronts.items())}
    _family(lines, "corral_front_connections_total", "counter", "Connections the front handed to an upstream.",
            ((_labels(service=s, upstream=u.id), float(u.connections)) for s, st in stats.items()
             for u in st.upstreams))
    _family(lines, "corral_front_active_connections", "gauge", "Connections open through the front now.",
            ((_labels(service=s), float(st.active)) for s, st in stats.items()))
    _family(lines, "corral_front_bytes_total", "counter", "Bytes relayed by the front.",
            ((_labels(service=s, direction=d), float(v)) for s, st in stats.items()
             for d, v in (("in", st.bytes_in), ("out", st.bytes_out))))
    _family(lines, "corral_front_errors_total", "counter", "Upstream connects or relays that failed.",
            ((_labels(service=s, upstream=u.id), float(u.errors)) for s, st in stats.items()
             for u in st.upstreams))
    _family(lines, "corral_front_ejections_total", "counter", "Times an upstream was ejected (its breaker opened).",
            ((_labels(service=s), float(st.ejections)) for s, st in stats.items()))
    _head(lines, "corral_front_connect_duration_seconds", "histogram",
          "How long each connect from the front to an upstream took (failed ones too), seconds.")
    for name, front in stats.items():
        for u in front.upstreams:
            base = f'service="{_esc(name)}",upstream="{_esc(u.id)}"'
            for bound, n in zip(CONNECT_BOUNDS, u.connect_buckets, strict=True):
                add(f'corral_front_connect_duration_seconds_bucket{{{base},le="{bound}"}} {n}')
            add(f'corral_front_connect_duration_seconds_bucket{{{base},le="+Inf"}} {u.connect_count}')
            add(f"corral_front_connect_duration_seconds_sum{{{base}}} {u.connect_sum}")
            add(f"corral_front_connect_duration_seconds_count{{{base}}} {u.connect_count}")
    vols = sorted(stack.storage.items())
    _family(lines, "corral_storage_size_bytes", "gauge", "The size the spec gives the service's volume, bytes.",
            ((_labels(service=n), float(u.size)) for n, u in vols))
    _family(lines, "corral_storage_used_bytes", "gauge", "What the service's volume holds, bytes, as last measured.",
            ((_labels(service=n), float(u.used)) for n, u in vols if u.used is not None))
    _family(lines, "corral_storage_inodes", "gauge", "Files and directories in the service's volume, as last measured.",
            ((_labels(service=n), float(u.inodes)) for n, u in vols if u.inodes is not None))
    _family(lines, "corral_storage_measure_seconds", "gauge", "How long the last measurement of the volume took.",
            ((_labels(service=n), u.seconds) for n, u in vols if u.seconds is not None))
    sched = sorted(stack.schedules.items())
    for key, kind, what in (("runs", "counter", "Runs a schedule started (corral run's too)."),
                            ("skipped", "counter", "Runs skipped: the last still ran (concurrency: forbid)."),
                            ("missed", "counter", "Runs that fell due while no agent ran (not replayed).")):
        _family(lines, f"corral_schedule_{key}_total", kind, what,
                ((_labels(service=n), float(st.get(key, 0))) for n, st in sched))
    _family(lines, "corral_schedule_next_run_timestamp_seconds", "gauge", "When the schedule is next due, Unix time.",
            ((_labels(service=n), float(st["next"])) for n, st in sched if st.get("next")))
    _family(lines, "corral_rollouts_total", "counter", "Applies that replaced instances, by how they ended.",
            ((_labels(result=r), float(c)) for r, c in sorted(counters.rollouts.items())))
    _family(lines, "corral_operations_total", "counter", "Operations on the stack, by how they ended (the audit "
            "trail's records).",
            ((_labels(op=o, outcome=r), float(c)) for (o, r), c in sorted(counters.operations.items())))
    me = resource.getrusage(resource.RUSAGE_SELF)
    _family(lines, "process_cpu_seconds_total", "counter", "The agent's CPU time, seconds.",
            (("", me.ru_utime + me.ru_stime),))
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    _family(lines, "process_resident_memory_bytes", "gauge", "The agent's resident memory.", (("", float(rss)),))
    _family(lines, "process_open_fds", "gauge", "The agent's open file descriptors.", (("", float(_open_fds())),))
    _family(lines, "process_start_time_seconds", "gauge", "When the agent started, Unix time.",
            (("", _START),))
    return "\n".join(lines) + "\n"


_START = time.time()


def _open_fds() -> int:
    # Linux 6.2 and later give the count as the directory's size: a stat, not a listing of
    # every descriptor (a millisecond for the agent's few hundred pipes and sockets).
    n = os.stat("/proc/self/fd").st_size
    return n if n > 0 else len(os.listdir("/proc/self/fd"))
