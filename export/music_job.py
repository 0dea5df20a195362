"""The part of a bundle export that needs the torch music model: the float32 ONNX graphs and the torch
outputs that the checks compare every ONNX variant with - in this process, or in a child process.

Why a child: the torch model (MERT + adapter, 4 GB float32 at real size), what the ONNX exporter keeps
referenced after exporting it and the checkpoint pages it touched stay resident in the exporting process
(deleting the model freed ~1 GB of them, measured), and would sit under int8 quantization's own peak. A
child gives all of it back when it exits. It is a fresh interpreter (``python -m export.music_job``), not
a multiprocessing worker, so a caller's script needs no ``if __name__ == "__main__"`` guard; the job and
the result (or the exception, re-raised in the parent) travel as pickle files in the bundle's temporary
folder.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

from mullama_sdk.errors import BundleError

_JOB = ".music_job.pickle"
_RESULT = ".music_job.result.pickle"


@dataclasses.dataclass(frozen=True)
class MusicJob:
    """Inputs of :meth:`run` (all picklable): the sources as :func:`training.loading.open_sources` takes
    them, the folder for the two graphs, the check windows and torch's thread count (the same arithmetic
    in a child as in the parent)."""

    checkpoint: Path
    llama_dir: Path
    mert_dir: Path
    trust_pickle: bool
    folder: Path
    windows: tuple[np.ndarray, ...]
    torch_threads: int

    def run(self):
        """Write ``encoder.fp32.onnx`` and ``adapter.fp32.onnx`` into ``folder``; return the torch model's
        outputs on ``windows`` (:class:`export.verify.OnnxReference`)."""
        import torch

        from export.onnx_export import export_adapter, export_encoder
        from export.verify import onnx_reference
        from training.loading import build_music_model, open_sources

        torch.set_num_threads(self.torch_threads)
        src = open_sources(self.checkpoint, self.llama_dir, self.mert_dir, trust_pickle=self.trust_pickle)
        music = build_music_model(src)
        export_encoder(music, Path(self.folder) / "encoder.fp32.onnx")
        export_adapter(music, Path(self.folder) / "adapter.fp32.onnx")
        return onnx_reference(music, list(self.windows))


def run_in_child(job: MusicJob):
    """:meth:`MusicJob.run` in a fresh Python process; its exception, if any, is raised here."""
    folder = Path(job.folder)
    job_path, result_path = folder / _JOB, folder / _RESULT
    with open(job_path, "wb") as f:
        pickle.dump(job, f)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "export.music_job", str(job_path)], env=env,
                              capture_output=True, text=True)
        if not result_path.is_file():
            raise BundleError(f"the music model's ONNX export died in its child process (exit {proc.returncode}; "
                              f"out of memory?): {proc.stderr.strip()[-2000:]}")
        with open(result_path, "rb") as f:
            ok, value = pickle.load(f)
    finally:
        job_path.unlink(missing_ok=True)
        result_path.unlink(missing_ok=True)
    if not ok:
        raise value
    return value


def _child_main(job_path: str) -> int:
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    try:
        outcome = (True, job.run())
    except Exception as e:  # noqa: BLE001 - every error goes back to the parent, typed
        outcome = (False, e)
    with open(Path(job_path).parent / _RESULT, "wb") as f:
        pickle.dump(outcome, f)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
