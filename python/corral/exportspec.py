"""The spec's ``export:`` block: per-engine settings ``corral export`` uses and corral
itself ignores (see :mod:`corral.export`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ExportSpec", "KubernetesExport", "NomadExport"]

_DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KubernetesExport(_Model):
    """``export.kubernetes``: where the objects go and how they look."""

    namespace: Annotated[str, Field(pattern=_DNS_LABEL)] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    """Added to every object's labels (beside the app.kubernetes.io ones)."""
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """The type of the Service an ``expose:`` becomes."""
    wait_image: str = "busybox:1.36"
    """The image of the init containers that wait for dependencies."""
    storage_class: str | None = None
    """The StorageClass of the volume claims (the cluster's default when unset)."""


class NomadExport(_Model):
    """``export.nomad``: the job's placement and the driver of image-less services."""

    datacenters: list[str] = Field(default_factory=lambda: ["*"])
    region: str | None = None
    namespace: str | None = None
    driver: Literal["exec", "raw_exec"] = "exec"
    """The driver of services without ``image`` (those with one use ``docker``)."""


class ExportSpec(_Model):
    """``export: {kubernetes: {...}, nomad: {...}}``."""

    kubernetes: KubernetesExport = KubernetesExport()
    nomad: NomadExport = NomadExport()
