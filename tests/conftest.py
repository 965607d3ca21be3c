"""Shared fixtures: one tiny model per session, and one local Ray cluster for integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "zephyr-ray" / "torch_extensions"))
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from zephyr_ray.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """``family_dir(arch)``: the tiny random model of a base-model family, built once per session."""
    from zephyr_ray.models import build_tiny

    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = build_tiny(tmp_path_factory.mktemp(f"tiny-{arch}"), seed=0, arch=arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from zephyr_ray.models import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray cluster owned by this test session (shut down only by it)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def shared_file(*parts: str) -> Path:
    """A file of ../shared/data, or skip the test when the folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


# Ray fixtures: a test that uses one (directly or through another fixture) is a `ray` test.
RAY_FIXTURES = {"ray_cluster", "ray_head"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that reaches a Ray fixture ``ray``, so ``-m "not ray and not slow"`` (``make test-fast``)
    never starts a cluster; marks written by hand stay for tests that start their own."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _no_ray_in_the_fast_suite(request, monkeypatch):
    """Under ``make test-fast`` (ZEPHYR_RAY_TESTS=fast) a test that starts Ray without a ``ray``/``slow`` mark
    fails at once, instead of silently making the inner loop slow."""
    if os.environ.get("ZEPHYR_RAY_TESTS") != "fast":
        return
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts Ray: mark it `ray` or `slow` (make test-fast runs neither)")

    monkeypatch.setattr(ray, "init", refuse)
