"""The audio loader's fuzz target (tests/fuzz_audio.py) in CI, for a bounded time: no exception other than
AudioError, no crash, no hang, no memory blow-up. Each engine runs in a child process with an address-space
limit and a per-input watchdog; the input being decoded is saved so that a finding can be replayed with
``python -m tests.fuzz_audio replay PATH``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz_audio import check_array, check_bytes, mutate, seed_files

ROOT = Path(__file__).resolve().parents[1]
#: Hypothesis examples in the default run (~10-20 s on 2 cores); derandomized, so CI is reproducible.
HYPOTHESIS_EXAMPLES = 2000


def _run(args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    last = tmp_path / "last_input.bin"
    cmd = [sys.executable, "-W", "error::RuntimeWarning", "-m", "tests.fuzz_audio", *args, "--last-input", str(last),
           "--input-timeout", "20"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"fuzzing hung (> {timeout} s); the input being decoded is saved in {last}: {e}")
    assert out.returncode == 0, (f"finding (exit {out.returncode}); replay with `python -m tests.fuzz_audio replay "
                                 f"{last}`\n{out.stdout[-2000:]}\n{out.stderr[-6000:]}")
    return out


def test_the_harness_is_not_vacuous():
    seeds = seed_files()
    assert {"WAV-PCM_16", "FLAC-PCM_16", "OGG-VORBIS", "MP3-MPEG_LAYER_III"} <= set(seeds)
    assert all(check_bytes(data) == "ok" for data in seeds.values())
    assert check_bytes(b"") == "error" and check_bytes(b"RIFF" + bytes(100)) == "error"
    data = seeds["WAV-PCM_16"]
    assert mutate(data, [(2, 100, b"")]) == data[:100]
    assert mutate(data, [(4, 40, b"\x0b\x01\x00")])[40:44] == (0xFFFFFFFF).to_bytes(4, "little")
    import numpy as np

    assert check_array(np.zeros(24_000, np.float32), 24_000) == "ok"
    assert check_array(np.zeros(24_000, np.float32), "24000") == "error"


def test_fuzz_loader_with_hypothesis(tmp_path):
    out = _run(["hypothesis", "--max-examples", str(HYPOTHESIS_EXAMPLES)], tmp_path, timeout=240)
    summary = re.search(r"fuzz_audio: (\d+) inputs in ([\d.]+) s: (.*)", out.stdout)
    assert summary, out.stdout[-2000:]
    print(summary.group(0))
    counts = dict(kv.split("=") for kv in summary.group(3).split(", "))
    assert int(summary.group(1)) >= HYPOTHESIS_EXAMPLES
    # Both outcomes happen, for bytes and for arrays: the fuzzer reaches real decoding, not only errors.
    assert all(int(counts[k]) > 0 for k in ("bytes_ok", "bytes_error", "array_ok", "array_error")), counts


@pytest.mark.parametrize("seconds", [pytest.param(10, id="10s"), pytest.param(600, id="10min", marks=pytest.mark.slow)])
def test_fuzz_loader_with_atheris(tmp_path, seconds):
    pytest.importorskip("atheris", reason="coverage-guided fuzzing needs `pip install atheris`")
    out = _run(["atheris", f"-max_total_time={seconds}", "-timeout=20", "-rss_limit_mb=3072", "-print_final_stats=1"],
               tmp_path, timeout=seconds + 180)
    done = re.search(r"Done (\d+) runs in (\d+) second", out.stderr)
    assert done, out.stderr[-3000:]
    print(done.group(0))
    assert int(done.group(1)) > 0
