"""Shared fixtures: the tiny generated model assets, built once per test session."""

from __future__ import annotations

import pytest

from tests.assets.make_assets import TinyAssets, build_tiny_assets


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """Tiny LLaMA + MERT + MU-LLaMA checkpoint + test audio, in the real formats (about 10 s to build)."""
    return build_tiny_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory):
    """A bundle of the tiny model with every variant (f32/q8_0/q4_k_m, fp32/fp16/int8), verified on export."""
    from export.bundle import BundleOptions, build_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny.bundle"
    options = BundleOptions(quants=("f32", "q8_0", "q4_k_m"), encoder_precisions=("fp32", "fp16", "int8"),
                            verify_llm=True)
    return build_bundle(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir, out, options=options)


@pytest.fixture(scope="session")
def reference_model(tiny_assets: TinyAssets):
    """The torch reference of the tiny model (float32)."""
    from training.loading import load_reference

    return load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir)


@pytest.fixture(scope="session")
def exact_captioner(tiny_bundle):
    """The runtime on the f32 GGUF + fp32 graphs with exact llama.cpp arithmetic: comparable to torch."""
    from mullama_sdk import Captioner

    cap = Captioner.from_pretrained(tiny_bundle, quant="f32", encoder_precision="fp32", exact=True,
                                    n_threads=2, batch_size=3)
    yield cap
    cap.close()
