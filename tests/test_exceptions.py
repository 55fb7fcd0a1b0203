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
