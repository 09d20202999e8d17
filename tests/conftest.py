"""Shared test settings: hypothesis runs derandomized with no deadline, so CI is repeatable
on a slow shared 2-core machine."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "tensorsam",
    deadline=None,
    derandomize=True,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "tensorsam"))


import pytest


@pytest.fixture(autouse=True)
def _restore_tensorly_backend():
    """Peers (tltorch, tednet) set tensorly's global backend at import; later tests must not see it."""
    import tensorly

    backend = tensorly.get_backend()
    yield
    if tensorly.get_backend() != backend:
        tensorly.set_backend(backend)


@pytest.fixture
def load_benchmark():
    """``load_benchmark("name")``: benchmarks/name.py imported as a module (benchmarks/ is no package)."""
    import importlib.util
    import sys
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load
