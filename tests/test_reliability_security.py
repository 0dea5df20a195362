"""Security of what the export reads: checkpoints are loaded with ``torch.load(weights_only=True)``
(one allow-listed class, argparse.Namespace), anything needing full unpickling is refused with a message
naming ``--trust-checkpoint``, and no code path calls ``torch.load`` around that rule.

(Bundle paths that try to leave the bundle folder - ``..``, absolute names, backslashes, NUL, symlinked
files and folders, ONNX external data - are covered in test_reliability_bundle.py and
test_bundle_validation.py; the runtime's no-unpickling guarantee in test_reliability_bundle.py.)
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mullama_sdk.errors import CheckpointError
from training.reference.loading import torch_load

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this creates the file ``marker``: the proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil(path: Path, marker: Path, legacy: bool = False, content: dict | None = None) -> Path:
    payload = _Payload()
    payload.marker = str(marker)
    tmp = path.with_name(path.name + ".tmp")  # ``content`` may be memory-mapped from ``path`` itself
    torch.save({**(content or {"model": {}}), "args": payload}, tmp, _use_new_zipfile_serialization=not legacy)
    tmp.replace(path)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip format", "legacy format"])
def test_checkpoint_needing_unpickling_is_refused(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    path = _evil(tmp_path / "evil.pth", marker, legacy)
    with pytest.raises(CheckpointError, match="--trust-checkpoint") as info:
        torch_load(path)
    assert "evil.pth" in str(info.value) and not marker.exists()


def test_export_cli_refuses_and_names_the_flag(tiny_assets, tmp_path):
    """The whole export, from the command line, with a checkpoint carrying a payload in its ``args``."""
    from training.reference.loading import torch_load as load

    marker = tmp_path / "PWNED"
    content = load(tiny_assets.checkpoint)
    _evil(tmp_path / "checkpoint.pth", marker, content={k: v for k, v in content.items() if k != "args"})
    cmd = [sys.executable, "-m", "export", "bundle", "--checkpoint", str(tmp_path / "checkpoint.pth"),
           "--llama-dir", str(tiny_assets.llama_dir), "--mert-dir", str(tiny_assets.mert_dir),
           "--out", str(tmp_path / "out.bundle"), "--quant", "f32", "--encoder-precision", "fp32"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--trust-checkpoint" in out.stderr and "checkpoint.pth" in out.stderr
    assert not marker.exists() and not (tmp_path / "out.bundle").exists()


@pytest.mark.parametrize("which", ["mert", "llama"])
def test_every_weight_file_goes_through_the_same_gate(tiny_assets, tmp_path, which):
    """MERT's pytorch_model.bin and Meta's consolidated.*.pth are pickles too."""
    from training.reference.build import load_reference

    marker = tmp_path / "PWNED"
    src = tiny_assets.mert_dir if which == "mert" else tiny_assets.llama_dir
    folder = tmp_path / which
    shutil.copytree(src, folder)
    if which == "llama":
        shutil.copy(tiny_assets.tokenizer, folder)  # the flat layout: tokenizer.model beside the weights
    name = "pytorch_model.bin" if which == "mert" else "consolidated.00.pth"
    content = torch_load(folder / name)
    _evil(folder / name, marker, content=content)
    # The deltas-only checkpoint makes the loader read both the LLaMA shards and MERT's weights.
    checkpoint = tiny_assets.root / "checkpoint_deltas.pth"
    with pytest.raises(CheckpointError, match=rf"(?s){name} holds objects.*--trust-checkpoint"):
        load_reference(checkpoint,
                       folder if which == "llama" else tiny_assets.llama_dir,
                       folder if which == "mert" else tiny_assets.mert_dir)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"PK\x03\x04" + b"\0" * 64])
def test_unreadable_checkpoints_are_checkpoint_errors(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pth"):
        torch_load(path)


def _torch_load_calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load" and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]


def test_torch_load_is_only_called_through_the_gate():
    """Static check over the packages: every ``torch.load`` lives in training.reference.loading.torch_load and passes
    ``weights_only=not trust_pickle``; nothing calls pickle.load(s) or numpy.load(allow_pickle=True)."""
    offenders = []
    for package in ("mullama_sdk", "native_bridge", "export", "training", "bench", "examples"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            rel = path.relative_to(ROOT).as_posix()
            for call in _torch_load_calls(tree):
                kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
                if rel != "training/reference/loading.py" or kw.get("weights_only") != "not trust_pickle":
                    offenders.append(f"{rel}:{call.lineno}: torch.load({', '.join(f'{k}={v}' for k, v in kw.items())})")
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    owner = ast.unparse(node.func.value)
                    if owner in ("pickle", "cPickle", "dill") and node.func.attr in ("load", "loads", "Unpickler"):
                        offenders.append(f"{rel}:{node.lineno}: {owner}.{node.func.attr}")
                    if node.func.attr == "load" and owner in ("np", "numpy") and any(
                            k.arg == "allow_pickle" and ast.unparse(k.value) != "False" for k in node.keywords):
                        offenders.append(f"{rel}:{node.lineno}: numpy.load(allow_pickle=...)")
    assert not offenders, "\n".join(offenders)
