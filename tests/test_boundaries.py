"""The package layers and their boundaries, read from the source (every import, including those
inside functions and ``TYPE_CHECKING`` blocks).

``server/types.py`` and ``server/errors.py`` are the leaf every layer may import;
``server/kernels`` < ``server/model`` < ``server/core`` < ``server/api`` < ``server/app.py``, with
``server/observability`` reporting on all of them and only its ``metrics`` module knowing
prometheus_client.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SERVER.rglob("*.py"))}


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports: ``from a.b import c`` yields ``a.b.c`` when that is a module
    of ours, else ``a.b``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                names.add(sub if sub in MODULES else node.module)
    return names


def ours(path: Path) -> set[str]:
    return {n for n in imported(path) if n in MODULES and n != "server"}


def third_party(path: Path) -> set[str]:
    return {n.split(".")[0] for n in imported(path)}


def in_package(package: str) -> list[str]:
    return [m for m in MODULES if m == package or m.startswith(package + ".")]


def test_the_layers_exist():
    for package in ("server.api", "server.core", "server.model", "server.kernels", "server.observability"):
        assert len(in_package(package)) > 1, package
    assert "server.types" in MODULES


def test_no_import_cycles():
    graph = {m: ours(p) for m, p in MODULES.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_leaf_imports_no_framework_and_nothing_above_it():
    for leaf in ("server.types", "server.errors"):
        path = MODULES[leaf]
        assert not third_party(path) & {"torch", "numpy", "grpc", "grpc_health", "pydantic", "pydantic_settings",
                                        "prometheus_client", "asr"}, leaf
        assert ours(path) <= {"server.errors"}, (leaf, ours(path))


@pytest.mark.parametrize("package", ["server.model", "server.kernels"])
def test_model_and_kernels_know_no_transport_and_no_layer_above(package):
    for m in in_package(package):
        path = MODULES[m]
        assert not third_party(path) & {"grpc", "grpc_health", "asr", "prometheus_client", "aiohttp", "websockets"}, m
        above = {n for n in ours(path) if n.startswith(("server.api", "server.core", "server.observability",
                                                          "server.app", "server.cli", "server.config"))}
        assert not above, (m, above)
    if package == "server.kernels":
        for m in in_package(package):
            assert not {n for n in ours(MODULES[m]) if n.startswith("server.model")}, m


def test_core_never_imports_torch_grpc_or_the_protocols():
    for m in in_package("server.core"):
        path = MODULES[m]
        assert not third_party(path) & {"torch", "torchaudio", "grpc", "grpc_health", "asr", "prometheus_client"}, m
        assert not {n for n in ours(path) if n.startswith(("server.api", "server.app", "server.cli"))}, m


def test_only_the_metrics_module_imports_prometheus_client():
    users = [p.relative_to(ROOT).as_posix() for d in ("server", "client", "asr")
             for p in sorted((ROOT / d).rglob("*.py")) if "prometheus_client" in third_party(p)]
    assert users == ["server/observability/metrics.py"]


def test_observability_reports_without_reaching_into_transport():
    for m in in_package("server.observability"):
        assert not third_party(MODULES[m]) & {"grpc", "grpc_health", "asr", "torch"}, m
        assert not {n for n in ours(MODULES[m]) if n.startswith("server.api")}, m


def test_clients_never_import_the_server_and_the_server_never_imports_train_or_bench():
    for path in sorted((ROOT / "client").rglob("*.py")):
        assert "server" not in third_party(path), path
    for path in MODULES.values():
        assert not third_party(path) & {"train", "bench", "tests", "client"}, path


def test_a_boundary_violation_is_detected(tmp_path):
    """The reader above sees a function-level import (so the rules cannot pass by accident)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import grpc\n    from server.core import session\n")
    assert {"grpc", "server.core.session"} <= imported(probe)


def cpuinfo_readers(paths: dict[str, Path]) -> list[str]:
    """The modules that open ``/proc/cpuinfo`` or parse its ``flags`` line (string constants)."""
    return [m for m, p in paths.items() if any(isinstance(n, ast.Constant) and n.value in ("/proc/cpuinfo", "flags")
                                               for n in ast.walk(ast.parse(p.read_text())))]


def test_one_module_reads_the_cpus_flags(tmp_path):
    """``server/kernels/cpu.py`` is the one reader of ``/proc/cpuinfo``; the precision policy and the
    native back ends ask it."""
    assert cpuinfo_readers(MODULES) == ["server.kernels.cpu"]
    second = tmp_path / "second.py"
    second.write_text("def f(text):\n    return [l for l in text.splitlines() if l.startswith('flags')]\n")
    assert cpuinfo_readers({"second": second}) == ["second"]


def private_writes(path: Path) -> list[str]:
    """Assignments in ``path`` to another object's private attribute (``other._name = ...``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in targets:
            for a in ast.walk(target):
                if (isinstance(a, ast.Attribute) and a.attr.startswith("_") and not a.attr.startswith("__")
                        and not (isinstance(a.value, ast.Name) and a.value.id in ("self", "cls"))):
                    found.append(f"{path.name}:{node.lineno} {ast.unparse(target)}")
    return found


def test_no_module_writes_another_objects_private_fields(tmp_path):
    """Objects change each other through public methods and constructor arguments."""
    assert [w for p in MODULES.values() for w in private_writes(p)] == []
    probe = tmp_path / "probe.py"
    probe.write_text("def f(linear, q):\n    linear._quantize = q\n    self_like = linear\n    self_like._n += 1\n")
    assert private_writes(probe) == ["probe.py:2 linear._quantize", "probe.py:4 self_like._n"]
