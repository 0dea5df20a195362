"""The part of a bundle export that needs the torch music model: the float32 ONNX graphs and the torch
outputs that the checks compare every ONNX variant with - in this process, or in a child process.

Why a child: the torch model (MERT + adapter, 4 GB float32 at real size), what the ONNX exporter keeps
referenced after exporting it and the checkpoint pages it touched stay resident in the exporting process
(deleting the model freed ~1 GB of them, measured), and would sit under int8 quantization's own peak. A
child gives all of it back when it exits. It is a fresh interpreter (``python -m export.music_export``), not
a multiprocessing worker, so a caller's script needs no ``if __name__ == "__main__"`` guard; the job and
the result (or the exception's type and message, re-raised in the parent) travel as JSON and .npz files in
the bundle's temporary folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from export.bundle_layout import onnx_file
from mullama_sdk.errors import BundleError, DiskFullError
from mullama_sdk.manifest import ADAPTER_OUTPUTS, ENCODER_OUTPUTS

#: The float32 graphs :meth:`MusicJob.run` writes (the other precisions are made from them).
ENCODER_FP32 = onnx_file("encoder", "fp32")
ADAPTER_FP32 = onnx_file("adapter", "fp32")
_JOB = ".music_export.json"
_WINDOWS = ".music_export.windows.npz"
_RESULT = ".music_export.result.npz"
_ERROR = ".music_export.error.json"


@dataclasses.dataclass(frozen=True)
class MusicJob:
    """Inputs of :meth:`run`: the sources as :func:`training.reference.model_sources.open_sources` takes them (paths), the
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

        from export.verify import onnx_reference
        from training.reference.build import build_music_model
        from training.reference.model_sources import open_sources

        torch.set_num_threads(self.torch_threads)
        src = open_sources(self.checkpoint, self.llama_dir, self.mert_dir, trust_pickle=self.trust_pickle)
        music = build_music_model(src)
        write_fp32_graphs(music, Path(self.folder))
        return onnx_reference(music, list(self.windows))


def write_fp32_graphs(music, folder: Path) -> None:
    """:data:`ENCODER_FP32` and :data:`ADAPTER_FP32` of a torch music model (the benchmarks call it too)."""
    from export.onnx_export import export_adapter, export_encoder

    export_encoder(music, folder / ENCODER_FP32)
    export_adapter(music, folder / ADAPTER_FP32)


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

        return OnnxReference(windows, part("encoder", ENCODER_OUTPUTS),
                             part("adapter", ADAPTER_OUTPUTS))


def _error_type(name: str) -> type[Exception]:
    """The exception class a child reported: ours (the :mod:`mullama_sdk.errors` family) or
    a builtin; anything else becomes :class:`BundleError`."""
    import builtins

    from mullama_sdk import errors

    known = {cls.__name__: cls for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, Exception)}
    builtin = getattr(builtins, name, None)
    if name in known:
        return known[name]
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        return builtin
    return BundleError


#: The child's last stderr line on failure: the error as JSON, for when its error file cannot be written
#: (a full disk) or read.
_STDERR_TAG = "MULLAMA_MUSIC_JOB_ERROR "


def _reported_error(folder: Path, stderr: str) -> dict | None:
    """The child's ``{"type", "message"}``: from its error file, else from its stderr."""
    sources = []
    with contextlib.suppress(OSError):
        sources.append((folder / _ERROR).read_text())
    sources += [line[len(_STDERR_TAG):] for line in reversed(stderr.splitlines()) if line.startswith(_STDERR_TAG)]
    for text in sources:
        try:
            err = json.loads(text)
        except ValueError:
            continue
        if isinstance(err, dict) and isinstance(err.get("type"), str) and isinstance(err.get("message"), str):
            return err
    return None


def run_in_child(job: MusicJob):
    """:meth:`MusicJob.run` in a fresh Python process; its exception, if any, is raised here (same type).

    The child dies with this process (``PR_SET_PDEATHSIG`` on Linux, and it is killed when this process
    is interrupted), and is registered for :func:`export.interrupts.termination_handlers`' emergency exit.
    """
    from export import interrupts, safety

    folder = Path(job.folder)
    try:
        with safety.writing(folder / _WINDOWS, folder):
            job_path = _save_job(job)
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-m", "export.music_export", str(job_path), str(os.getpid())],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, encoding="utf-8", errors="replace")
        with interrupts.on_emergency(proc.kill):
            try:
                _stdout, stderr = proc.communicate()
            except BaseException:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                raise
        err = _reported_error(folder, stderr)
        if err is not None:
            raise _error_type(err["type"])(err["message"])
        if proc.returncode or not (folder / _RESULT).is_file():
            lines = [line.strip() for line in stderr.splitlines() if line.strip()]
            last = lines[-1][-300:] if lines else "no output"
            if safety.is_disk_full(None if not lines else RuntimeError(stderr[-4000:]), folder):
                raise safety.disk_full_error(folder / ENCODER_FP32, folder, cause=RuntimeError(last))
            how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                   else f"exit {proc.returncode}")
            raise BundleError(f"the music model's ONNX export died in its child process ({how}; out of memory?): "
                              f"{last}")
        with safety.writing(folder / _RESULT, folder):
            return _load_reference(folder / _RESULT, job.windows)
    finally:
        for name in (_JOB, _WINDOWS, _RESULT, _ERROR):
            (folder / name).unlink(missing_ok=True)


def _child_main(job_path: str, parent_pid: int | None = None) -> int:
    from export import interrupts, safety

    interrupts.die_with_parent(parent_pid)
    folder = Path(job_path).parent
    try:
        job = _load_job(Path(job_path))
        reference = job.run()
        with safety.writing(folder / _RESULT, folder):
            _save_reference(reference, folder / _RESULT)
    except Exception as e:  # noqa: BLE001 - every error goes back to the parent, typed
        if safety.is_disk_full(e, folder) and not isinstance(e, DiskFullError):
            e = safety.disk_full_error(Path(getattr(e, "filename", None) or folder / ENCODER_FP32), folder, cause=e)
        report = json.dumps({"type": type(e).__name__, "message": str(e)})
        try:
            (folder / _ERROR).write_text(report)
        except OSError:
            (folder / _ERROR).unlink(missing_ok=True)
        print(_STDERR_TAG + report, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None))
