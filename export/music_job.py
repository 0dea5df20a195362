"""The part of a bundle export that needs the torch music model: the float32 ONNX graphs and the torch
outputs that the checks compare every ONNX variant with - in this process, or in a child process.

Why a child: the torch model (MERT + adapter, 4 GB float32 at real size), what the ONNX exporter keeps
referenced after exporting it and the checkpoint pages it touched stay resident in the exporting process
(deleting the model freed ~1 GB of them, measured), and would sit under int8 quantization's own peak. A
child gives all of it back when it exits. It is a fresh interpreter (``python -m export.music_job``), not
a multiprocessing worker, so a caller's script needs no ``if __name__ == "__main__"`` guard; the job and
the result (or the exception's type and message, re-raised in the parent) travel as JSON and .npz files in
the bundle's temporary folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mullama_sdk.errors import BundleError

#: The float32 graphs :meth:`MusicJob.run` writes (the other precisions are made from them).
ENCODER_FP32 = "encoder.fp32.onnx"
ADAPTER_FP32 = "adapter.fp32.onnx"
_JOB = ".music_job.json"
_WINDOWS = ".music_job.windows.npz"
_RESULT = ".music_job.result.npz"
_ERROR = ".music_job.error.json"


@dataclasses.dataclass(frozen=True)
class MusicJob:
    """Inputs of :meth:`run`: the sources as :func:`training.loading.open_sources` takes them (paths), the
    folder for the two graphs, the check windows and torch's thread count (the same arithmetic in a child
    as in the parent)."""

    checkpoint: Path
    llama_dir: Path
    mert_dir: Path
    trust_pickle: bool
    folder: Path
    windows: tuple[np.ndarray, ...]
    torch_threads: int

    def run(self):
        """Write :data:`ENCODER_FP32` and :data:`ADAPTER_FP32` into ``folder``; return the torch model's
        outputs on ``windows`` (:class:`export.verify.OnnxReference`)."""
        import torch

        from export.onnx_export import export_adapter, export_encoder
        from export.verify import onnx_reference
        from training.loading import build_music_model, open_sources

        torch.set_num_threads(self.torch_threads)
        src = open_sources(self.checkpoint, self.llama_dir, self.mert_dir, trust_pickle=self.trust_pickle)
        music = build_music_model(src)
        export_encoder(music, Path(self.folder) / ENCODER_FP32)
        export_adapter(music, Path(self.folder) / ADAPTER_FP32)
        return onnx_reference(music, list(self.windows))


# The job and its result cross the process boundary as JSON and .npz files (no pickle: nothing here
# unpickles, see tests/test_reliability_security.py), the error as its type name and message.
def _save_job(job: MusicJob) -> Path:
    folder = Path(job.folder)
    meta = {"checkpoint": str(job.checkpoint), "llama_dir": str(job.llama_dir), "mert_dir": str(job.mert_dir),
            "trust_pickle": job.trust_pickle, "folder": str(folder), "torch_threads": job.torch_threads,
            "n_windows": len(job.windows)}
    np.savez(folder / _WINDOWS, *job.windows)
    (folder / _JOB).write_text(json.dumps(meta))
    return folder / _JOB


def _load_job(job_path: Path) -> MusicJob:
    meta = json.loads(job_path.read_text())
    with np.load(job_path.parent / _WINDOWS, allow_pickle=False) as z:
        windows = tuple(z[f"arr_{i}"] for i in range(meta["n_windows"]))
    return MusicJob(Path(meta["checkpoint"]), Path(meta["llama_dir"]), Path(meta["mert_dir"]), meta["trust_pickle"],
                    Path(meta["folder"]), windows, meta["torch_threads"])


def _save_reference(ref, path: Path) -> None:
    arrays = {}
    for i, r in enumerate(ref.encoder):
        arrays.update({f"encoder{i}.{k}": v for k, v in r.items()})
    for i, r in enumerate(ref.adapter):
        arrays.update({f"adapter{i}.{k}": v for k, v in r.items()})
    np.savez(path, **arrays)


def _load_reference(path: Path, windows: tuple[np.ndarray, ...]):
    from export.verify import OnnxReference

    with np.load(path, allow_pickle=False) as z:
        def part(name: str, keys: tuple[str, ...]) -> tuple[dict[str, np.ndarray], ...]:
            return tuple({k: z[f"{name}{i}.{k}"] for k in keys} for i in range(len(windows)))

        return OnnxReference(windows, part("encoder", ("state_means", "n_frames")),
                             part("adapter", ("injection", "music_query")))


def _error_type(name: str) -> type[Exception]:
    """The exception class a child reported: ours (the :mod:`mullama_sdk.errors` family, ExportError) or
    a builtin; anything else becomes :class:`BundleError`."""
    import builtins

    from export.graphs import ExportError
    from mullama_sdk import errors

    known = {cls.__name__: cls for cls in (ExportError, *vars(errors).values())
             if isinstance(cls, type) and issubclass(cls, Exception)}
    builtin = getattr(builtins, name, None)
    if name in known:
        return known[name]
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        return builtin
    return BundleError


def run_in_child(job: MusicJob):
    """:meth:`MusicJob.run` in a fresh Python process; its exception, if any, is raised here (same type)."""
    folder = Path(job.folder)
    job_path = _save_job(job)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "export.music_job", str(job_path)], env=env,
                              capture_output=True, text=True)
        if (folder / _ERROR).is_file():
            err = json.loads((folder / _ERROR).read_text())
            raise _error_type(err["type"])(err["message"])
        if proc.returncode or not (folder / _RESULT).is_file():
            raise BundleError(f"the music model's ONNX export died in its child process (exit {proc.returncode}; "
                              f"out of memory?): {proc.stderr.strip()[-2000:]}")
        return _load_reference(folder / _RESULT, job.windows)
    finally:
        for name in (_JOB, _WINDOWS, _RESULT, _ERROR):
            (folder / name).unlink(missing_ok=True)


def _child_main(job_path: str) -> int:
    job = _load_job(Path(job_path))
    try:
        reference = job.run()
    except Exception as e:  # noqa: BLE001 - every error goes back to the parent, typed
        (Path(job.folder) / _ERROR).write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
        return 1
    _save_reference(reference, Path(job.folder) / _RESULT)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
