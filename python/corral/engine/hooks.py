"""What a deployment sets up around its instances, as hooks in the manner of Nomad's
allocation runner: each ``prerun`` before the first instance starts (returning warnings),
``stopping`` when ``down`` begins, ``postrun`` once every instance has stopped.

- :class:`VolumesHook`: storage directories exist (size-limited volumes mounted) before
  anything starts.
- :class:`CgroupsHook`: one memory cgroup per instance that asks for memory.
- :class:`MeshHook`: the deployment's CA, a certificate per service, renewal.
- :class:`FrontsHook`: a proxy before each exposed service's healthy instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from corral._core import (
    Authority,
    Cgroups,
    IssuedCert,
    Proxy,
    create_volume_image,
    grow_volume_image,
    mount_volume_image,
    mounted_volume_image,
    unmount_volume,
)
from corral.engine.frontlink import Front, FrontLink, KeeperFront, KeeperGone
from corral.engine.instance import InstanceRuntime
from corral.engine.stack import Stack
from corral.exceptions import CorralError
from corral.identity import credentials
from corral.lifecycle import State
from corral.spec import DeploymentSpec
from corral.units import format_bytes
from corral.volumes import image_of, owner_ids, space_of

__all__ = ["CgroupsHook", "FrontsHook", "Hook", "MeshHook", "VolumesHook"]

_PROBED_AGAIN = (State.STARTING, State.RUNNING)
"""A re-adopted instance's states before its probes pass again."""


class Hook:
    """One concern set up around a deployment's instances."""

    name = "hook"

    def prerun(self, stack: Stack) -> list[str]:
        """Before the first instance starts; returns warnings. Raising aborts ``up``."""
        return []

    def stopping(self, stack: Stack) -> None:
        """``down`` (or a rollback) begins."""

    def postrun(self, stack: Stack) -> None:
        """Every instance has stopped (or never started); undo what ``prerun`` did."""


class VolumesHook(Hook):
    """Creates each storage volume's directory; for ``enforce: volume``, makes the service's
    image on first need (growing it when the size grew) and mounts it there, and unmounts
    it once everything stopped (see :mod:`corral.volumes`)."""

    name = "volumes"

    def __init__(self, volumes: dict[str, Path]) -> None:
        self.volumes = volumes
        self.mounted: list[Path] = []

    def prerun(self, stack: Stack) -> list[str]:
        warnings: list[str] = []
        for name, path in self.volumes.items():
            self._make(stack, name, path)
            warnings += self._enforce(stack, name, path)
        return warnings

    @staticmethod
    def _make(stack: Stack, name: str, path: Path, spec: DeploymentSpec | None = None) -> None:
        """The directory; one corral makes for a service that runs as another user
        (``user:``) is that user's, 0700, as a volume is its container's."""
        if path.is_dir():
            return
        path.mkdir(parents=True, exist_ok=True)
        svc = (spec or stack.spec).services.get(name)
        if svc is not None and (svc.user is not None or svc.group is not None):
            uid, gid, _, _ = credentials(svc.user, svc.group)
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
            os.chmod(path, 0o700)

    def add(self, stack: Stack, volumes: dict[str, Path], spec: DeploymentSpec | None = None) -> None:
        """Volumes of services an apply adds (or moves) by ``spec``: created (mounted), and
        known to the ledger."""
        for name, path in volumes.items():
            if self.volumes.get(name) != path:
                self._make(stack, name, path, spec)
                for w in self._enforce(stack, name, path, spec):
                    stack.warn(w)
                st = (spec or stack.spec).services[name].resources.storage
                stack.resources.add_volume(str(path), str(space_of(st.enforce if st else "none", path,
                                                                   stack.state_dir)))
                self.volumes[name] = path

    def _enforce(self, stack: Stack, name: str, path: Path, spec: DeploymentSpec | None = None) -> list[str]:
        svc = (spec or stack.spec).services.get(name)
        st = svc.resources.storage if svc is not None else None
        if st is None or st.enforce != "volume" or svc is None:
            return []
        image = image_of(stack.state_dir, name)
        now = mounted_volume_image(path)
        if now is not None:
            if Path(now) != image:
                raise CorralError(f"storage path {st.path} of {name}: {now} is mounted there, not its volume {image}")
            self.mounted.append(path)  # still mounted: a dead agent's stack, taken over
            return []
        warnings = []
        if not image.exists():
            if any(path.iterdir()):
                raise CorralError(f"storage path {st.path} of {name} already holds files, which its new volume "
                                  f"would hide: move them away, or use enforce: none")
            image.parent.mkdir(mode=0o700, exist_ok=True)
            uid, gid, _, _ = credentials(svc.user, svc.group)
            create_volume_image(image, int(st.size), *owner_ids(uid, gid))
            fresh = True
        else:
            fresh = False
            have = image.stat().st_size
            if have < st.size:
                grow_volume_image(image, int(st.size))
                warnings.append(f"volume of {name} grown from {format_bytes(have)} to {format_bytes(st.size)}")
            elif have > st.size:
                warnings.append(f"volume of {name} is {format_bytes(have)}, more than its size {format_bytes(st.size)}"
                                f": kept so (shrinking an image could lose data; down --volumes makes it anew)")
        mount_volume_image(image, path)
        self.mounted.append(path)
        if fresh:
            os.chmod(path, 0o700)  # owner-only, as every directory corral makes
        return warnings

    def remove(self, name: str) -> list[str]:
        """A service an apply dropped: its volume is unmounted (the image is kept, as at
        down) and forgotten; returns warnings."""
        path = self.volumes.pop(name, None)
        if path is None or path not in self.mounted:
            return []
        self.mounted.remove(path)
        try:
            if unmount_volume(path):
                return [f"volume at {path} was busy: detached, it goes once its last file is closed"]
        except OSError as e:
            return [f"cannot unmount the volume at {path}: {e}"]
        return []

    def postrun(self, stack: Stack) -> None:
        while self.mounted:
            path = self.mounted.pop()
            try:
                if unmount_volume(path):
                    stack.warn(f"volume at {path} was busy: detached, it goes once its last file is closed")
            except OSError as e:
                stack.warn(f"cannot unmount the volume at {path}: {e}")


class CgroupsHook(Hook):
    """One memory cgroup per instance that asks for memory; a warning, once, when the machine
    offers no memory controller, and one per instance whose cgroup cannot be made."""

    name = "cgroups"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cgroups: Cgroups | None = None
        self._name = ""
        self._unavailable: str | None = None
        self._stack: Stack | None = None

    def prerun(self, stack: Stack) -> list[str]:
        self._name, self._stack = stack.name, stack
        return self.add(list(stack.instances.values()))

    def add(self, insts: list[InstanceRuntime]) -> list[str]:
        """Cgroups for these instances (at up, and for those placed later: a scale-up, an
        apply); returns warnings. The controller is looked for on first need."""
        wants = [i for i in insts if i.svc.resources.memory or i.svc.resources.memory_max]
        if not wants:
            return []
        if self.cgroups is None and self._unavailable is None:
            cg = Cgroups.detect(self.root, f"corral/{self._name}")
            if cg.mode == "unavailable":
                self._unavailable = cg.reason
            else:
                self.cgroups = cg
                if self._stack is not None:
                    self._stack.cgroups = cg
        if self.cgroups is None:
            names = sorted({i.p.service for i in wants})
            return [f"memory limits not enforced ({self._unavailable}); {', '.join(names)} run without them"]
        warnings = []
        for inst in wants:
            r = inst.svc.resources
            try:
                inst.cgroup = self.cgroups.create(inst.id, max=r.memory_max or r.memory,
                                                  low=r.memory if r.memory_max else None, swap=r.swap)
            except (OSError, CorralError) as e:
                warnings.append(f"memory limit of {inst.id} not enforced: {e}")
        return warnings

    def forget(self, inst: InstanceRuntime) -> None:
        """An instance left the deployment (a scale-down): its cgroup goes."""
        if self.cgroups is not None and inst.cgroup is not None:
            self.cgroups.remove(inst.cgroup)
            inst.cgroup = None

    def postrun(self, stack: Stack) -> None:
        if self.cgroups is None:
            return
        for inst in stack.instances.values():
            self.forget(inst)
        self.cgroups.remove(self.cgroups.base)


class MeshHook(Hook):
    """With any mTLS front, every service gets a certificate from the deployment's CA, renewed
    after two thirds of its life (fronts present the new one from their next handshake)."""

    name = "mesh"

    def __init__(self) -> None:
        self.ca: Authority | None = None
        self.certs: dict[str, IssuedCert] = {}
        self._fronts: dict[str, Front] = {}
        self._rotation: asyncio.Task[None] | None = None

    def prerun(self, stack: Stack) -> list[str]:
        if not any(s.mtls for s in stack.spec.services.values()):
            return []
        self.ca = Authority(stack.state_dir / "tls", f"{stack.name}.corral")
        for name in stack.spec.services:
            self.certs[name] = self._issue(stack, name)
        stack.journal.note(f"mesh: {len(self.certs)} certificates from {self.ca.ca_path}")
        self._rotation = asyncio.get_running_loop().create_task(self._rotate(stack), name="corral-certs")
        return []

    def extend(self, stack: Stack) -> None:
        """After an apply: the mesh starts when the new spec first asks for it, and services
        new to it get their certificates (processes already running see them from their
        next start)."""
        if self.ca is None:
            self.prerun(stack)
            return
        for name in stack.spec.services:
            if name not in self.certs:
                self.certs[name] = self._issue(stack, name)

    def _issue(self, stack: Stack, name: str) -> IssuedCert:
        """Issues ``name``'s certificate; a service that runs as another user (``user:``)
        gets its certificate and key as its own, and the directories above them become
        0711 (enter, not list), so it can open them; the CA key stays 0600 and corral's."""
        assert self.ca is not None
        cert = self.ca.issue(name, stack.spec.mesh.cert_lifetime)
        svc = stack.spec.services[name]
        uid, gid, _, _ = credentials(svc.user, svc.group)
        if uid is not None or gid is not None:
            for f in (cert.cert_path, cert.key_path):
                os.chown(f, -1 if uid is None else uid, -1 if gid is None else gid)
            for d in (stack.state_dir, self.ca.ca_path.parent, cert.cert_path.parent):
                os.chmod(d, 0o711)
        return cert

    def present_on(self, fronts: dict[str, Front]) -> None:
        """Renewed certificates go to these mTLS fronts."""
        self._fronts = fronts

    async def _rotate(self, stack: Stack) -> None:
        assert self.ca is not None
        life = stack.spec.mesh.cert_lifetime
        while True:
            await asyncio.sleep(life * 2 / 3)
            for name in stack.spec.services:
                cert = self._issue(stack, name)
                self.certs[name] = cert
                front = self._fronts.get(name)
                if front is not None and stack.spec.services[name].mtls:
                    front.set_certificate(cert.cert_pem, cert.key_pem)
            stack.journal.note(f"mesh: {len(self.certs)} certificates renewed")

    def postrun(self, stack: Stack) -> None:
        if self._rotation is not None:
            self._rotation.cancel()
            self._rotation = None


class FrontsHook(Hook):
    """A proxy on each exposed service's port, balancing over its healthy instances; it
    follows every transition at once, so an instance that starts stopping gets no new
    connection before its signal goes out. With ``keeper`` (``up -d``: the keeper's
    ``fronts.sock``) the fronts live in the keeper and outlive this agent (see
    :mod:`corral.engine.frontlink`); without, in this process."""

    name = "fronts"

    def __init__(self, ports: dict[str, int], mesh: MeshHook, keeper: Path | None = None) -> None:
        self.ports = ports
        self.mesh = mesh
        self.fronts: dict[str, Front] = {}
        self.link = FrontLink(keeper) if keeper is not None else None

    def active(self, service: str, iid: str) -> int:
        """Connections open now through ``service``'s front to instance ``iid``."""
        front = self.fronts.get(service)
        if front is None:
            return 0
        return front.active(iid)

    def prerun(self, stack: Stack) -> list[str]:
        for name, port in self.ports.items():
            self.fronts[name] = self._bind(stack, name, port)
        if self.link is not None:
            # What a dead agent's unfinished change left in the keeper goes.
            with contextlib.suppress(KeeperGone):
                self.link.call("keep", names=sorted(self.fronts))
        self.mesh.present_on(self.fronts)
        stack.listeners.append(lambda t: self._follow(stack, t.service))
        return []

    def rehome(self) -> list[str]:
        """The keeper died: its fronts are bound again here, as they were. Returns what
        could not be, each with why."""
        problems = []
        for name, front in self.fronts.items():
            if isinstance(front, KeeperFront):
                try:
                    front.rehome()
                except OSError as e:
                    problems.append(f"the front of {name} on {front.address} cannot listen again: "
                                    f"{e.strerror or e}")
        self.link = None  # later fronts bind here
        return problems

    def _tls(self, stack: Stack, name: str) -> dict[str, Any]:
        svc = stack.spec.services[name]
        if not svc.mtls:
            return {}
        assert self.mesh.ca is not None
        cert = self.mesh.certs[name]
        return {"ca_pem": self.mesh.ca.ca_pem, "cert_pem": cert.cert_pem, "key_pem": cert.key_pem,
                "allow": [self.mesh.ca.spiffe_id(s) for s in svc.allow]}

    def _bind(self, stack: Stack, name: str, port: int) -> Front:
        svc = stack.spec.services[name]
        try:
            if self.link is not None:
                return KeeperFront(self.link, name, stack.host, port, strategy=svc.balance, hold=svc.front_hold,
                                   protocol=svc.front_protocol, tls=self._tls(stack, name))
            return Proxy(stack.host, port, strategy=svc.balance, hold=svc.front_hold, protocol=svc.front_protocol,
                         **self._tls(stack, name))
        except OSError as e:
            raise stack.spec.error(("services", name, "expose"), f"cannot listen on {stack.host}:{port}: "
                                   f"{e.strerror or e}") from None

    def reconfigure(self, stack: Stack, name: str, port: int | None) -> Front | None:
        """Makes ``name``'s front what ``stack.spec`` says now: on the same port, the
        strategy, hold, protocol and TLS change in place (the listener and open connections stay); a new
        port binds a new front and closes the old one; no port closes it. Returns the front
        it replaced or closed, if any."""
        old = self.fronts.get(name)
        if old is not None and port is not None and old.port == port:
            old.set_strategy(stack.spec.services[name].balance)
            old.set_hold(stack.spec.services[name].front_hold)
            old.set_protocol(stack.spec.services[name].front_protocol)
            old.set_tls(**self._tls(stack, name))
            return None
        if old is not None and port is not None and self.link is not None:
            # The keeper holds one front per service: the old one closes as the new binds.
            self.fronts[name] = self._bind(stack, name, port)
            if isinstance(old, KeeperFront):
                old.forget()
            self._follow(stack, name)
            return old
        if port is not None:
            self.fronts[name] = self._bind(stack, name, port)
            self._follow(stack, name)
        else:
            self.fronts.pop(name, None)
        if old is not None:
            old.close()
        return old

    def _follow(self, stack: Stack, service: str) -> None:
        front = self.fronts.get(service)
        if front is None:
            return
        up = [(i.id, stack.host, i.main_port) for i in stack.by_service.get(service, [])
              if i.main_port is not None and (i.state is State.HEALTHY or (i.vouched and i.state in _PROBED_AGAIN))]
        front.set_upstreams(up)

    def stopping(self, stack: Stack) -> None:
        for front in self.fronts.values():
            front.close()

    def postrun(self, stack: Stack) -> None:
        for front in self.fronts.values():
            with contextlib.suppress(OSError):
                front.close()
        self.fronts.clear()
        if self.link is not None:
            self.link.close()

    def discovery(self, service: str, registry: Any) -> dict[str, Any]:
        """What discovery answers for ``service``: its registered instances (health,
        address, named ports), its front's address, and the registry's generation."""
        front = self.fronts.get(service)
        instances = []
        for i in registry.instances(service):
            ports = {k.removeprefix("port."): int(v) for k, v in i.meta.items() if k.startswith("port.")}
            instances.append({"id": i.id, "host": i.host, "port": i.port, "address": i.address,
                              "healthy": i.healthy, "ports": ports})
        return {"name": service, "front": front.address if front is not None else None,
                "instances": sorted(instances, key=lambda x: str(x["id"])), "generation": registry.generation}
