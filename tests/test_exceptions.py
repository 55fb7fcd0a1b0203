from __future__ import annotations

import corral
from corral import exceptions as ex


def test_tree_is_rooted_at_corral_error() -> None:
    for name in ex.__all__:
        cls = getattr(ex, name)
        assert issubclass(cls, ex.CorralError), name
        assert getattr(corral, name) is cls
    assert issubclass(ex.ConfigError, ValueError)
    assert issubclass(ex.PortsExhausted, ex.PortError)
    assert issubclass(ex.PortInUse, ex.PortError)
    assert issubclass(ex.InsufficientResources, ex.ResourceError)


def test_spec_error_names_file_line_field() -> None:
    e = ex.SpecError("unknown service 'dbb'", "corral.yaml", 14, "services.api.depends_on")
    assert str(e) == "corral.yaml:14: services.api.depends_on: unknown service 'dbb'"
    assert (e.file, e.line, e.field) == ("corral.yaml", 14, "services.api.depends_on")


def test_public_names_are_exported() -> None:
    for name in corral.__all__:
        assert hasattr(corral, name), name


# --- every native failure path raises a class of the tree (or an OSError with its errno) ---

import asyncio  # noqa: E402
import errno  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from corral import (  # noqa: E402
    Authority,
    LoadBalancer,
    PortAllocator,
    ProbeSpec,
    Proxy,
    ResourceRequest,
    RetryPolicy,
    Supervisor,
    Topology,
    retry,
)


@pytest.mark.parametrize("make", [
    lambda: LoadBalancer(["a"], strategy="nope"),  # type: ignore[arg-type]
    lambda: RetryPolicy.fixed(-1),
    lambda: RetryPolicy.fixed(1, jitter="weird"),  # type: ignore[arg-type]
    lambda: RetryPolicy.exponential(float("nan")),
    lambda: ResourceRequest(numa="sideways"),  # type: ignore[arg-type]
    lambda: ResourceRequest(cache="tiny"),  # type: ignore[arg-type]
    lambda: ResourceRequest(cpu=float("inf")),
    lambda: ProbeSpec("ping"),  # type: ignore[arg-type]
    lambda: ProbeSpec("tcp", period=0),
    lambda: Proxy(strategy="nope"),  # type: ignore[arg-type]
    lambda: Proxy(max_attempts=0),
    lambda: Proxy(max_ejection_percent=101),
    lambda: Proxy(host="localhost"),
    lambda: PortAllocator(30000, 20000),
    lambda: PortAllocator(20000, 20010, check_bind="nowhere"),
])
def test_bad_arguments_are_config_errors(make: object) -> None:
    with pytest.raises(ex.ConfigError) as e:
        make()  # type: ignore[operator]
    assert isinstance(e.value, ValueError) and str(e.value)


def test_enum_errors_name_the_argument_the_value_and_every_accepted_name() -> None:
    with pytest.raises(ex.ConfigError, match=r"strategy: \"nope\" is not one of 'round_robin', 'weighted', "
                                             r"'least_connections', 'ip_hash', 'random'"):
        LoadBalancer(["a"], strategy="nope")  # type: ignore[arg-type]
    with pytest.raises(ex.ConfigError, match=r"numa: \"sideways\" is not one of 'none', 'prefer', 'require'"):
        ResourceRequest(numa="sideways")  # type: ignore[arg-type]


def test_both_spellings_of_weighted_are_one_strategy() -> None:
    a = LoadBalancer(["x"], strategy="weighted")
    b = LoadBalancer(["x"], strategy="weighted_round_robin")
    assert a.strategy == b.strategy == "weighted"


def test_missing_sysfs_is_file_not_found_with_its_errno(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        Topology.from_sysfs(tmp_path / "missing")
    assert e.value.errno == errno.ENOENT and "missing" in str(e.value)


def test_spawn_errors_carry_their_errno(tmp_path: Path) -> None:
    sup = Supervisor()
    with pytest.raises(FileNotFoundError) as e:
        sup.spawn("x-0", ["/definitely/not/a/program"])
    assert e.value.errno == errno.ENOENT and "/definitely/not/a/program" in str(e.value)
    with pytest.raises(ex.ConfigError):
        sup.spawn("x-0", [])


def test_mesh_errors(tmp_path: Path) -> None:
    bad = tmp_path / "tls"
    bad.mkdir()
    (bad / "ca.crt").write_text("not a certificate")
    (bad / "ca.key").write_text("not a key")
    with pytest.raises(ex.MeshError, match="certificate"):
        Authority(bad, "x.corral")
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(OSError) as e:
        Authority(blocked / "tls", "x.corral")
    assert e.value.errno == errno.ENOTDIR and not isinstance(e.value, ex.CorralError)


def test_proxy_errors(tmp_path: Path) -> None:
    with pytest.raises(ex.ProxyError, match="mTLS front"):
        Proxy(ca_pem="garbage", cert_pem="garbage", key_pem="garbage")
    plain = Proxy()
    try:
        with pytest.raises(ex.ProxyError, match="not an mTLS front"):
            plain.set_certificate("a", "b")
        with pytest.raises(OSError) as e:
            Proxy(port=plain.port)
        assert e.value.errno == errno.EADDRINUSE and not isinstance(e.value, ex.CorralError)
    finally:
        plain.close()
    ca = Authority(tmp_path / "tls", "x.corral")
    cert = ca.issue("db")
    front = Proxy(ca_pem=ca.ca_pem, cert_pem=cert.cert_pem, key_pem=cert.key_pem)
    try:
        with pytest.raises(ex.ProxyError):
            front.set_certificate("garbage", "garbage")
    finally:
        front.close()


def test_ports_errors() -> None:
    p = PortAllocator(20000, 20000)
    p.allocate(20000)
    with pytest.raises(ex.PortsExhausted):
        p.allocate()
    with pytest.raises(ex.PortInUse):
        p.allocate(20000)
    with pytest.raises(ex.PortError):
        p.release(19999)


def test_retry_exhausted_comes_from_the_core_on_both_loops() -> None:
    policy = RetryPolicy.fixed(0, max_attempts=3)

    @retry(policy, retry_if_result=lambda r: r is None)
    def sync() -> None:
        return None

    @retry(policy, retry_if_result=lambda r: r is None)
    async def not_sync() -> None:
        return None

    for call in (sync, lambda: asyncio.run(not_sync())):
        with pytest.raises(ex.RetryExhausted) as e:
            call()
        assert e.value.attempts == 3 and e.value.last_result is None
        assert str(e.value) == "gave up after 3 attempts: the result still asked for a retry"


def test_attempts_step_the_budget_and_the_count() -> None:
    budget = corral.RetryBudget(ratio=0.0, min_per_second=0.0)
    a = RetryPolicy.fixed(0.5, max_attempts=5).attempts(budget)
    assert a.after_failure() is None, "an empty budget allows no retry"
    b = RetryPolicy.fixed(0.5, max_attempts=3).attempts()
    assert [b.after_failure(), b.after_failure(), b.after_failure()] == [0.5, 0.5, None]
    assert b.attempts == 3


def test_unknown_service_is_a_config_error_and_a_key_error() -> None:
    e = ex.UnknownService("unknown service 'x'", "x")
    assert isinstance(e, ex.ConfigError) and isinstance(e, KeyError) and isinstance(e, ValueError)
    assert str(e) == "unknown service 'x'" and e.service == "x" and e.exit_code == 2
    assert issubclass(ex.AgentUnavailable, ex.AgentError) and issubclass(ex.AgentAlreadyRunning, ex.AgentError)
    assert ex.AgentAlreadyRunning("running", 42).pid == 42 and ex.AgentUnavailable("gone").exit_code == 1


def test_errors_cross_the_wire_as_the_same_class() -> None:
    from corral.agent.wire import from_wire, to_wire

    for e in (ex.UnknownService("unknown service 'x'", "x"), ex.AgentAlreadyRunning("running", 7),
              ex.PortInUse("port 1 is in use", 1, "pid 9 (x)"), ex.DeploymentError("db not up"),
              ex.SpecError("bad", "corral.yaml", 3, "services.a", more=[ex.SpecError("worse", "corral.yaml", 4)])):
        back = from_wire(to_wire(e))
        assert type(back) is type(e) and back.args == e.args and str(back) == str(e)
    spec = from_wire(to_wire(ex.SpecError("bad", "f", 1, "x", more=[ex.SpecError("worse", "f", 2)])))
    assert isinstance(spec, ex.SpecError) and [str(m) for m in spec.all] == ["f:1: x: bad", "f:2: worse"]
    assert type(from_wire({"type": "NotAClass", "message": "m"})) is ex.CorralError
