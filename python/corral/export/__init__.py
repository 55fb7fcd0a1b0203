"""``corral export``: the same ``corral.yaml`` as another engine's manifests.

One engine-neutral reading of the spec (:mod:`corral.export.model`) and one module per
engine over it (:mod:`~corral.export.kubernetes`, :mod:`~corral.export.nomad`): a third
engine is one more module and one more entry in :data:`ENGINES`. Nothing is dropped
silently: what an engine cannot carry is named in the export itself (Kubernetes: the header
comment and the ``corral.dev/beyond`` annotation; Nomad: the job's and groups' ``Meta``).
"""

from __future__ import annotations

import json
from pathlib import Path

from corral.exceptions import ConfigError
from corral.export.model import StackModel, build
from corral.spec import DeploymentSpec

__all__ = ["ENGINES", "export", "render"]

ENGINES = ("kubernetes", "nomad")


def export(spec: DeploymentSpec, base: Path) -> StackModel:
    """The spec resolved for export; raises :class:`ConfigError` naming every service that
    has no ``image`` (the engines run containers; Nomad's exec drivers aside)."""
    return build(spec, base)


def render(spec: DeploymentSpec, base: Path, engine: str) -> list[tuple[str, str]]:
    """``(file name, text)`` for each document ``engine`` gets."""
    model = export(spec, base)
    if engine == "kubernetes":
        from corral.export import kubernetes

        missing = model.missing_images()
        if missing:
            raise ConfigError(f"kubernetes runs containers: give these services an image: {', '.join(missing)}")
        return kubernetes.render(model)
    if engine == "nomad":
        from corral.export import consul, nomad

        docs = [(f"{doc['Job']['ID']}.nomad.json", json.dumps(doc, indent=2) + "\n") for doc in nomad.jobs(model)]
        # Beside the jobs: `consul config write FILE` for each, before the jobs run.
        docs += [(f"{e['Name']}.service-intentions.json", json.dumps(e, indent=2) + "\n")
                 for e in consul.intentions(model)]
        return docs
    raise ConfigError(f"unknown engine {engine!r} (engines: {', '.join(ENGINES)})")
