"""``corral.yaml``: the deployment spec as pydantic models, one module per section.

Loading keeps the YAML node marks, so every problem, whether pydantic's or one of the
cross-checks (unknown dependency, cycle, unknown port name), is reported as
``file:line: field: message``. Durations are ``500ms``, ``10s``, ``5m``, ``1h`` or ``1m30s``
(a bare number is seconds); sizes are ``256Mi``, ``2Gi``, ``512M``, ``100k`` (a bare number
is bytes).

- :mod:`~corral.spec.common`: the scalars (durations, sizes, ports, names) and the base model;
- :mod:`~corral.spec.health`: probes;
- :mod:`~corral.spec.service`: a service (resources, restart, shutdown, dependencies, update);
- :mod:`~corral.spec.deployment`: the deployment and its stack-wide sections;
- :mod:`~corral.spec.checks`: what one model cannot see (references, collisions, files);
- :mod:`~corral.spec.load`: text to a validated spec.
"""

from __future__ import annotations

from corral.spec.checks import find_cycle, read_env_file, substitute_ports
from corral.spec.deployment import DeploymentSpec, EventsSpec, LogSpec, MeshSpec, MetricsSpec, TracingSpec
from corral.spec.health import HealthSpec, HttpCheck, Probe, TcpCheck
from corral.spec.load import load_spec, parse_spec, project_name
from corral.spec.service import Dependency, Resources, RestartSpec, ServiceSpec, ShutdownSpec, StorageSpec, UpdateSpec
from corral.units import parse_duration, parse_size

__all__ = [
    "Dependency",
    "DeploymentSpec",
    "EventsSpec",
    "HealthSpec",
    "HttpCheck",
    "LogSpec",
    "MeshSpec",
    "MetricsSpec",
    "Probe",
    "Resources",
    "RestartSpec",
    "ServiceSpec",
    "ShutdownSpec",
    "StorageSpec",
    "TcpCheck",
    "TracingSpec",
    "UpdateSpec",
    "find_cycle",
    "load_spec",
    "parse_duration",
    "parse_size",
    "parse_spec",
    "project_name",
    "read_env_file",
    "substitute_ports",
]
