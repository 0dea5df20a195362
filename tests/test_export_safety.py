"""An exporter you can trust with your files (issue #15): ``--overwrite`` only replaces a previous bundle,
a full disk is one line, SIGTERM/SIGHUP leave no partial folder and no orphan, ``--no-strict`` never ships a
failed default, progress and verify output."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from export import safety
from export.build import BundleOptions, build_bundle
from export.sizes import SpaceEstimate
from mullama_sdk.errors import BundleError, DiskFullError

ROOT = Path(__file__).parents[1]
FAST = BundleOptions(quants=("f32",), encoder_precisions=("fp32",), verify_llm=False)


def _cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "export", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def _src_args(ckpt, llama, mert) -> list[str]:
    return ["--checkpoint", str(ckpt), "--llama-dir", str(llama), "--mert-dir", str(mert)]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if safety.PARTIAL_TAG in p.name]


def _one_line_error(r: subprocess.CompletedProcess | tuple[int, str], needle: str) -> None:
    code, err = (r.returncode, r.stderr) if isinstance(r, subprocess.CompletedProcess) else r
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("mullama-export:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


@pytest.fixture()
def work(tiny_assets, tmp_path):
    """A copy of the tiny inputs in a folder of their own (the refusals are tested on it, never on the
    session's assets), as (folder, checkpoint, llama_dir, mert_dir)."""
    folder = tmp_path / "work"
    shutil.copytree(tiny_assets.root, folder)
    rel = lambda p: folder / Path(p).relative_to(tiny_assets.root)  # noqa: E731
    return folder, rel(tiny_assets.checkpoint), rel(tiny_assets.llama_dir), rel(tiny_assets.mert_dir)


@pytest.fixture()
def fast_music(tiny_bundle, reference_model, monkeypatch):
    """The music step without its torch ONNX export (seconds per test): the float32 graphs come from the
    session's bundle, the reference outputs from the session's torch model."""
    from export import music_export
    from export.verify import onnx_reference

    def run(job):
        for name in (music_export.ENCODER_FP32, music_export.ADAPTER_FP32):
            shutil.copyfile(tiny_bundle / name, Path(job.folder) / name)
        return onnx_reference(reference_model, list(job.windows))

    monkeypatch.setattr(music_export.MusicJob, "run", run)


# ------------------------------------------------------------------------------------------ overwrite
def test_overwrite_refuses_the_folder_holding_the_inputs(work):
    folder, ckpt, llama, mert = work
    before = _snapshot(folder)
    t0 = time.perf_counter()
    r = _cli("bundle", *_src_args(ckpt, llama, mert), "--out", str(folder), "--overwrite")
    _one_line_error(r, "refusing")
    assert "holds the input" in r.stderr
    assert _snapshot(folder) == before
    assert time.perf_counter() - t0 < 20  # before the heavy imports (generous for a loaded machine)


def test_overwrite_refuses_the_working_directory_and_its_parent(work, tmp_path):
    folder, ckpt, llama, mert = work
    (folder / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    for out in (".", ".."):
        r = _cli("bundle", *_src_args(ckpt, llama, mert), "--out", out, "--overwrite", cwd=folder)
        _one_line_error(r, "refusing --out")
    assert _snapshot(tmp_path) == before


def test_overwrite_refuses_a_bundle_folder_with_other_files(work, tmp_path):
    folder, ckpt, llama, mert = work
    old = tmp_path / "old.bundle"
    old.mkdir()
    (old / "llm.f32.gguf").write_bytes(b"GGUF")
    (old / "mullama.json").write_text(json.dumps({"format": "mullama-bundle", "files": {"llm.f32.gguf": {}}}))
    (old / "notes.txt").write_text("my notes")
    before = _snapshot(old)
    r = _cli("bundle", *_src_args(ckpt, llama, mert), "--out", str(old), "--overwrite")
    _one_line_error(r, "notes.txt")
    assert _snapshot(old) == before
    (old / "notes.txt").unlink()
    (old / "mullama.json").unlink()
    r = _cli("bundle", *_src_args(ckpt, llama, mert), "--out", str(old), "--overwrite")
    _one_line_error(r, "not a bundle")
    assert (old / "llm.f32.gguf").exists()


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_symlink_or_file_as_out_is_refused_up_front(work, tmp_path, kind):
    folder, ckpt, llama, mert = work
    target = tmp_path / "target"
    target.mkdir()
    out = tmp_path / "out"
    if kind == "symlink":
        out.symlink_to(target)
    else:
        out.write_text("x")
    r = _cli("bundle", *_src_args(ckpt, llama, mert), "--out", str(out), "--overwrite")
    _one_line_error(r, "symbolic link" if kind == "symlink" else "is a file")
    assert out.is_symlink() if kind == "symlink" else out.read_text() == "x"


def test_protected_folders_are_refused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    (home / "mullama.json").write_text(json.dumps({"files": {}}))  # would pass as an (empty) old bundle
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "project")
    for out, why in ((Path("/"), "root folder"), (home, "home folder"), (Path("."), "working directory"),
                     (Path(".."), "home folder"), (tmp_path, "holds your home folder")):
        with pytest.raises(BundleError, match=why):
            safety.check_out(out, overwrite=True)
    assert (home / "mullama.json").exists()


def test_overwrite_replaces_only_a_previous_bundle_and_never_leaves_none(tiny_bundle, tiny_assets, tmp_path,
                                                                        monkeypatch, fast_music):
    import export.verify

    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    old = _snapshot(out)
    options = BundleOptions(quants=("f32",), encoder_precisions=("fp32",), verify_llm=False, overwrite=True)
    with monkeypatch.context() as m:  # a failure late in the export leaves the previous bundle as it was
        m.setitem(export.verify.ONNX_TOLERANCES, ("encoder", "fp32"), (0.0, None))
        with pytest.raises(BundleError, match="verification failed"):
            _export(tiny_assets, out, options)
    assert _snapshot(out) == old and os.listdir(tmp_path) == ["b"]
    _export(tiny_assets, out, options)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.fp32.onnx", "encoder.fp32.onnx", "llm.f32.gguf",
                                                     "mullama.json"]
    assert os.listdir(tmp_path) == ["b"]


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_into_place(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(safety, "_exchange", lambda a, b: False)
    new, out = tmp_path / ".b.partial-x", tmp_path / "b"
    for folder, text in ((new, "new"), (out, "old")):
        folder.mkdir()
        (folder / "mullama.json").write_text(text)
    safety.swap_into_place(new, out)
    assert (out / "mullama.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


# ------------------------------------------------------------------------------------------ disk space
def _export(tiny_assets, out, options=FAST, **kw):
    return build_bundle(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir, out, options=options,
                        **kw)


def test_free_space_is_checked_up_front(tiny_assets, tmp_path, monkeypatch, capsys):
    from export.cli import main

    monkeypatch.setattr(safety, "free_bytes", lambda path: 1 << 20)
    code = main(["bundle", "--checkpoint", str(tiny_assets.checkpoint), "--llama-dir", str(tiny_assets.llama_dir),
                 "--mert-dir", str(tiny_assets.mert_dir), "--out", str(tmp_path / "b"), "--quant", "f32"])
    err = capsys.readouterr().err
    _one_line_error((code, err), "not enough free space in")
    assert "needs about" in err and "1.0 MiB are free" in err
    assert os.listdir(tmp_path) == []


class _DiskFills:
    """The disk reports (almost) no free space once ``full`` is set: what a writer that only says
    "truncated file" or "return code 1" leaves behind."""

    def __init__(self, monkeypatch):
        self.full = False
        real = safety.free_bytes
        monkeypatch.setattr(safety, "free_bytes", lambda path: 4096 if self.full else real(path))


def _enospc(name: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)


@pytest.mark.parametrize("step", ["fp32-graph", "int8-protobuf", "gguf", "quantize", "manifest"])
def test_disk_full_at_each_step_is_one_error(tiny_assets, tmp_path, monkeypatch, request, step):
    import export.onnx_export
    import export.onnx_precision

    if step != "fp32-graph":
        request.getfixturevalue("fast_music")

    disk = _DiskFills(monkeypatch)
    options = FAST
    expect = {"fp32-graph": "adapter.fp32.onnx", "int8-protobuf": "encoder.int8.onnx", "gguf": "llm.f32.gguf",
              "quantize": "llm.q8_0.gguf", "manifest": "mullama.json"}[step]
    if step == "fp32-graph":
        real = export.onnx_export._verify_file

        def verify_file(staged, spec, dims):
            if staged.name == "adapter.fp32.onnx":
                raise _enospc(str(staged))
            return real(staged, spec, dims)

        monkeypatch.setattr(export.onnx_export, "_verify_file", verify_file)
    elif step == "int8-protobuf":
        from google.protobuf.message import DecodeError

        def quantize_int8(src, dst, **kw):
            disk.full = True
            raise DecodeError("Error parsing message with type 'onnx.ModelProto'")

        monkeypatch.setattr(export.onnx_precision, "quantize_int8", quantize_int8)
        options = BundleOptions(quants=("f32",), encoder_precisions=("fp32", "int8"), verify_llm=False)
    elif step == "gguf":
        import gguf

        def write_tensor_data(self, *a, **k):
            raise _enospc("llm.f32.gguf")

        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_tensor_data)
    elif step == "quantize":
        import llama_cpp

        def quantize(*a):
            disk.full = True
            return 1

        monkeypatch.setattr(llama_cpp, "llama_model_quantize", quantize)
        options = BundleOptions(quants=("f32", "q8_0"), encoder_precisions=("fp32",), verify_llm=False)
    else:
        real_write = Path.write_text

        def write_text(self, *a, **k):
            if self.name == "mullama.json":
                raise _enospc(str(self))
            return real_write(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(DiskFullError) as info:
        _export(tiny_assets, tmp_path / "b", options)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("disk full") and expect in msg and "needs about" in msg, msg
    assert os.listdir(tmp_path) == []


_CHILD_ENOSPC = """
import errno, os, pathlib, numpy
def _load(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "encoder.fp32.onnx")
numpy.load = _load
if os.environ.get("MULLAMA_TEST_ERROR_FILE_FULL"):
    _write = pathlib.Path.write_text
    def write_text(self, *a, **k):
        if self.name.endswith("error.json"):
            self.write_bytes(b'{"type": "Bund')  # a truncated error file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return _write(self, *a, **k)
    pathlib.Path.write_text = write_text
"""


@pytest.mark.parametrize("error_file", ["written", "truncated"])
def test_disk_full_in_the_child_is_one_error(tiny_assets, tmp_path, monkeypatch, error_file):
    """The music export's child process runs out of space; with its error file unreadable the parent reads
    the error from the child's stderr (no JSONDecodeError)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(_CHILD_ENOSPC))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    if error_file == "truncated":
        monkeypatch.setenv("MULLAMA_TEST_ERROR_FILE_FULL", "1")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DiskFullError) as info:
        _export(tiny_assets, out / "b", BundleOptions(quants=("f32",), encoder_precisions=("fp32",),
                                                      verify_llm=False, isolate_music_export=True))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("disk full") and "encoder.fp32.onnx" in msg, msg
    assert os.listdir(out) == []


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 1.3 MB tmpfs (root only; skipped where mount is not permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1300k", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("isolate", [False, True])
def test_a_real_full_disk_is_one_error(tiny_assets, small_tmpfs, monkeypatch, isolate):
    import export.build

    with pytest.raises(DiskFullError, match="not enough free space"):  # the up-front estimate
        _export(tiny_assets, small_tmpfs / "b")
    # Past a (wrong) estimate, the disk fills for real: in the music step's child (window file 0.8 MB +
    # graphs 0.8 MB), or in this process at the GGUF.
    monkeypatch.setattr(export.build, "estimate_space", lambda cfg, options: SpaceEstimate(0, 0, {
        k: 0 for k in ("fp32", "fp16", "int8", "f32", "f16", "q8_0", "q4_k_m")}))
    with pytest.raises(DiskFullError) as info:
        _export(tiny_assets, small_tmpfs / "b", BundleOptions(quants=("f32",), encoder_precisions=("fp32",),
                                                              verify_llm=False, isolate_music_export=isolate))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("disk full") and "while writing" in msg, msg
    assert os.listdir(small_tmpfs) == []


# ------------------------------------------------------------------------------------------ signals
def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text in cmdline and state != "Z":
                pids.append(int(entry.name))
    return pids


def _default_signals() -> None:
    """``preexec_fn``: SIGHUP and SIGTERM at their defaults in the child, whatever this test run inherited
    (under ``nohup`` SIGHUP is ignored, and an export then keeps it ignored on purpose)."""
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 240) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the export ended (exit {proc.returncode}) before the signal point: "
                                 f"{proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("the signal point was never reached")


def _kill_all(proc: subprocess.Popen, marker: str) -> None:
    for pid in [proc.pid, *_pids_mentioning(marker)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.mark.parametrize("sig,point", [
    (signal.SIGTERM, "partial"), (signal.SIGHUP, "partial"), (signal.SIGTERM, "onnx"),
    (signal.SIGTERM, "child"), (signal.SIGHUP, "child"),
])
def test_termination_signals_leave_nothing(tiny_assets, tmp_path, sig, point):
    out = tmp_path / "out"
    out.mkdir()
    isolate = "yes" if point == "child" else "no"
    child = f"{out}/.b{safety.PARTIAL_TAG}"  # in the child's command line (its job file), not the parent's
    cmd = [sys.executable, "-m", "export", "bundle", *_src_args(tiny_assets.checkpoint, tiny_assets.llama_dir,
                                                                tiny_assets.mert_dir),
           "--out", str(out / "b"), "--quant", "f32", "--encoder-precision", "fp32", "--verify-llm", "no",
           "--isolate", isolate]
    proc = subprocess.Popen(cmd, cwd=ROOT, preexec_fn=_default_signals, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        if point == "partial":
            _wait_for(lambda: _partials(out), proc)
        elif point == "onnx":
            _wait_for(lambda: any((out / p / "encoder.fp32.onnx").exists() for p in _partials(out)), proc)
        else:
            _wait_for(lambda: _pids_mentioning(child), proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, err
        assert "Traceback" not in err and "interrupted" in err, err
        assert os.listdir(out) == []
        t_end = time.monotonic() + 10
        while _pids_mentioning(child) and time.monotonic() < t_end:
            time.sleep(0.1)
        assert _pids_mentioning(child) == []  # no orphaned child
    finally:
        _kill_all(proc, child)


def test_killed_parent_takes_its_child_and_the_next_run_removes_the_debris(tiny_assets, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "export", "bundle", *_src_args(tiny_assets.checkpoint, tiny_assets.llama_dir,
                                                                tiny_assets.mert_dir),
           "--out", str(out / "b"), "--quant", "f32", "--encoder-precision", "fp32", "--isolate", "yes"]
    proc = subprocess.Popen(cmd, cwd=ROOT, preexec_fn=_default_signals, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = f"{out}/.b{safety.PARTIAL_TAG}"
    try:
        _wait_for(lambda: _pids_mentioning(child), proc)
        proc.kill()  # SIGKILL: nothing can be cleaned up
        proc.wait(timeout=30)
        t_end = time.monotonic() + 10
        while _pids_mentioning(child) and time.monotonic() < t_end:
            time.sleep(0.1)
        assert _pids_mentioning(child) == []  # the child died with its parent (PR_SET_PDEATHSIG)
    finally:
        _kill_all(proc, child)
    (stale,) = _partials(out)
    foreign = out / ".b.partial-olderversion"
    foreign.mkdir()
    with caplog.at_level(logging.WARNING, logger="export.safety"):
        removed = safety.sweep_partials(out, "b")
    assert [p.name for p in removed] == [stale]
    assert sorted(os.listdir(out)) == [foreign.name]          # a folder without our owner file is kept...
    assert "interrupted export" in caplog.text and "not removed" in caplog.text  # ...and both are reported


def test_a_live_owner_keeps_its_folder(tmp_path):
    folder = tmp_path / ".b.partial-live"
    folder.mkdir()
    safety.write_owner(folder, tmp_path / "b")
    assert safety.sweep_partials(tmp_path, "b", report=lambda m: None) == [] and folder.exists()
    info = safety.read_owner(folder)
    info["start"] = "1"  # the same pid, another process (pid reuse)
    (folder / safety.OWNER_FILE).write_text(json.dumps(info))
    assert safety.sweep_partials(tmp_path, "b", report=lambda m: None) == [folder] and not folder.exists()


_STUCK = """
import os, shutil, signal, sys, time
from pathlib import Path
from export import interrupts as safety
safety.EMERGENCY_GRACE_SECONDS = 0.5
folder = Path(sys.argv[1])
with safety.termination_handlers():
    safety.register_emergency(lambda: shutil.rmtree(folder))
    try:  # "ready" inside the try: a signal that lands while it is printed must take the same path
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        time.sleep(60)  # an unwinding that does not finish (native code, a hung cleanup)
"""


def test_a_stuck_main_thread_is_cleaned_up_by_the_watcher(tmp_path):
    folder = tmp_path / ".b.partial-x"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _STUCK, str(folder)], cwd=ROOT, preexec_fn=_default_signals,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert proc.returncode == 128 + signal.SIGTERM
        assert not folder.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


_DEFERRED = """
import os, signal, time
from export import interrupts as safety
with safety.termination_handlers():
    try:
        with safety.deferred_signals():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
            print("finished the block", flush=True)
    except safety.Interrupted as e:
        print("then raised", e.signum, flush=True)
"""


def test_signals_wait_for_a_deferred_block():
    r = subprocess.run([sys.executable, "-c", _DEFERRED], cwd=ROOT, preexec_fn=_default_signals, capture_output=True,
                       text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout.splitlines() == ["finished the block", f"then raised {int(signal.SIGHUP)}"], r.stderr


# ------------------------------------------------------------------------------------------ --no-strict
def test_no_strict_never_ships_a_failed_default(tiny_assets, tmp_path, monkeypatch, caplog, fast_music):
    import export.verify
    from mullama_sdk import Captioner

    monkeypatch.setitem(export.verify.ONNX_TOLERANCES, ("adapter", "int8"), (0.0, None))
    out = _export(tiny_assets, tmp_path / "b", BundleOptions(quants=("f32",), encoder_precisions=("fp32", "int8"),
                                                             verify_llm=False, strict=False))
    raw = json.loads((out / "mullama.json").read_text())
    assert raw["default_encoder_precision"] == "fp32"
    assert raw["failed_verification"] == ["adapter/int8"]
    assert raw["verification"]["adapter/int8"]["passed"] is False
    assert any("--no-strict" in n and "adapter/int8" in n for n in raw["notes"])
    with caplog.at_level(logging.WARNING, logger="mullama_sdk.captioner"):
        Captioner.from_pretrained(out, n_threads=1).close()
        assert "adapter/int8" in caplog.text and "loaded now passed" in caplog.text
        caplog.clear()
        Captioner.from_pretrained(out, encoder_precision="int8", n_threads=1).close()
        assert "outputs may be wrong" in caplog.text


def test_no_strict_with_nothing_passing_writes_nothing():
    from export.bundle_layout import demote_failed as _demote_failed

    raw = {"default_encoder_precision": "int8", "default_quant": "q4_k_m", "notes": []}
    options = BundleOptions(quants=("q4_k_m", "q8_0"), encoder_precisions=("fp32", "int8"), strict=False)
    _demote_failed(raw, ["llm/q4_k_m", "encoder/int8"], options)
    assert (raw["default_encoder_precision"], raw["default_quant"]) == ("fp32", "q8_0")
    with pytest.raises(BundleError, match="no GGUF type passed"):
        _demote_failed(dict(raw), ["llm/q4_k_m", "llm/q8_0"], options)


# ------------------------------------------------------------------------------------------ progress
def test_progress_bar_on_a_terminal_and_heartbeat_in_a_log(tmp_path, monkeypatch):
    import export.progress as progress

    lines: list[str] = []
    live = io.StringIO()
    rep = progress.Reporter(lines.append, live=live)
    with rep.step("gguf: quantize q4_k_m", folder=tmp_path, expect_bytes=1000):
        (tmp_path / "x").write_bytes(b"0" * 500)
        time.sleep(0.8)
    assert lines[0] == "gguf: quantize q4_k_m" and lines[-1].startswith("  done in ")
    assert "[" in live.getvalue() and "50%" in live.getvalue() and live.getvalue().endswith("\r\x1b[K")

    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.3)
    lines.clear()
    with progress.Reporter(lines.append).step("verify: llama.cpp (hooked) vs torch"):
        time.sleep(0.9)
    assert any("still running after" in line for line in lines)


def test_path_errors_come_before_the_heavy_imports(tmp_path):
    code = ("import sys; from export.cli import main; rc = main(['bundle', '--checkpoint', 'missing.pth', "
            "'--llama-dir', '.', '--mert-dir', '.', '--out', 'x']); print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.stdout.split() == ["2", "False"], r.stderr
    assert r.stderr.strip() == "mullama-export: error: checkpoint not found: missing.pth"


# ------------------------------------------------------------------------------------------ verify
def test_verify_hashes_by_default(tiny_bundle, tiny_assets, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    gguf = bundle / "llm.q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[-100] ^= 0xFF  # same size, one flipped byte
    gguf.write_bytes(bytes(data))
    args = _src_args(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir)
    r = _cli("verify", str(bundle), *args, "--skip-llm")
    _one_line_error(r, "llm.q8_0.gguf fails its sha256 check")
    r = _cli("verify", str(bundle), *args, "--skip-llm", "--fast")
    assert r.returncode == 0, r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith("verify: OK:") and "not hashed: --fast" in summary


def test_verification_table_is_aligned():
    from export.verify import Check, format_table

    rows = [Check("encoder/fp32", 1e-6, 2e-7, 1.0, "rel <= 0.0001, frames equal", True, "5 inputs"),
            Check("llm/f32", 3e-4, 1e-5, None, "max|Δlogit| <= 0.001 (exact settings)", True, "top-1 9/9"),
            Check("trt-encoder/fp16", 0, 0, None, "rel <= 0.01 vs ORT fp32", False, "skipped: no GPU", skipped=True)]
    lines = format_table(rows).splitlines()
    body = [lines[0], *lines[2:]]
    for column in ("result", "tolerance"):
        start = lines[0].index(column)
        assert all(line[start - 2:start] == "  " and line[start] != " " for line in body), lines
    assert [line[lines[0].index("result"):].split()[0] for line in lines[2:]] == ["PASS", "PASS", "SKIP"]
