"""Shared fixtures: the tiny generated model assets, built once per test session."""

from __future__ import annotations

import pytest

from testkit.make_assets import TinyAssets, build_tiny_assets


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """Tiny LLaMA + MERT + MU-LLaMA checkpoint + test audio, in the real formats (about 10 s to build)."""
    return build_tiny_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory):
    """A bundle of the tiny model with every variant (f32/q8_0/q4_k_m, fp32/fp16/int8), verified on export."""
    from export.build import BundleOptions, build_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny.bundle"
    options = BundleOptions(quants=("f32", "q8_0", "q4_k_m"), encoder_precisions=("fp32", "fp16", "int8"),
                            verify_llm=True)
    return build_bundle(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir, out, options=options)


@pytest.fixture(scope="session")
def reference_model(tiny_assets: TinyAssets):
    """The torch reference of the tiny model (float32)."""
    from training.reference.build import load_reference

    return load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir)


@pytest.fixture(scope="session")
def exact_captioner(tiny_bundle):
    """The runtime on the f32 GGUF + fp32 graphs with exact llama.cpp arithmetic: comparable to torch."""
    from mullama_sdk import Captioner

    cap = Captioner.from_pretrained(tiny_bundle, quant="f32", encoder_precision="fp32", exact=True,
                                    n_threads=2, batch_size=3)
    yield cap
    cap.close()


# ---- `gpu` marker: tests that need an NVIDIA GPU with TensorRT skip cleanly elsewhere ------------
def _gpu_unusable_reason() -> str | None:
    """Why TensorRT cannot run here (no tensorrt / cuda-python / CUDA device), or None when it can."""
    from mullama_sdk.encoder_trt import INSTALL_HINT, cuda_device, import_tensorrt
    from mullama_sdk.errors import BackendUnavailableError

    problems = []
    for probe in (import_tensorrt, cuda_device):
        try:
            probe()
        except BackendUnavailableError as e:
            problems.append(str(e).replace("; " + INSTALL_HINT, ""))
    return "; ".join(problems) or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _gpu_unusable_reason()
    if reason is not None:
        skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU with TensorRT: {reason}")
        for item in gpu_items:
            item.add_marker(skip)
