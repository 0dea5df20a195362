"""Shared fixtures: the tiny generated model assets, built once per test session."""

from __future__ import annotations

import pytest

from tests.assets.make_assets import TinyAssets, build_tiny_assets


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """Tiny LLaMA + MERT + MU-LLaMA checkpoint + test audio, in the real formats (about 10 s to build)."""
    return build_tiny_assets(tmp_path_factory.mktemp("tiny"))
