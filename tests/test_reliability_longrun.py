"""Long runs: no memory growth over hundreds of captions, no native handle left after close() (file
descriptors, memory maps of the GGUF, RSS over open/close cycles), and a Captioner dropped without
close() frees its llama.cpp objects at once and in a valid order.

Measured in a child process that imports only the runtime, so the numbers are the SDK's (the test
process holds torch and every fixture).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = textwrap.dedent("""
    import gc, json, os, sys
    import llama_cpp
    from mullama_sdk import Captioner

    bundle, clip, phase, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    page = os.sysconf("SC_PAGE_SIZE")
    try:  # glibc keeps freed memory in its arenas; trim before measuring, to see what is really held
        import ctypes
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        trim = lambda _pad: None

    def rss():
        gc.collect()
        trim(0)
        return int(open("/proc/self/statm").read().split()[1]) * page

    fds = lambda: len(os.listdir("/proc/self/fd"))
    maps = lambda: sum(bundle in line for line in open("/proc/self/maps"))  # mmapped GGUF (and friends)
    out = {}

    def mixed(cap, vec, i):
        # Every entry point, sampled and greedy, new and repeated questions, paths and vectors.
        if i % 10 == 0:
            list(cap.caption_stream(vec, max_new_tokens=8, temperature=0))
        elif i % 10 == 1:
            cap.caption_batch([vec, clip], max_new_tokens=8, temperature=0)
        else:
            cap.caption(clip if i % 5 == 0 else vec, question=None if i % 3 else f"question {i}?",
                        max_new_tokens=8, temperature=0.7, seed=i)

    if phase == "captions":
        cap = Captioner.from_pretrained(bundle, n_threads=1, batch_size=2)
        vec = cap.encode(clip)
        for i in range(100):  # warm-up: every path once (the batch context is created lazily), allocator pools
            mixed(cap, vec, i)
        gc.collect()
        out["rss_start"] = rss()
        samples = []
        for i in range(n):
            mixed(cap, vec, i)
            if (i + 1) % max(1, n // 10) == 0:
                gc.collect()
                samples.append(rss())
        out["rss_end"] = rss()
        out["samples"] = samples
        cap.close()
    elif phase == "cycles":
        out["maps_before"] = maps()
        for i in range(n):
            cap = Captioner.from_pretrained(bundle, n_threads=1, batch_size=2)
            cap.caption_batch([clip, clip], max_new_tokens=2, temperature=0)
            cap.caption(clip, max_new_tokens=2, temperature=0)
            if i == 0:
                out["open_fds"], out["open_maps"] = fds(), maps()
            cap.close()
            gc.collect()
            if i == 0:  # after the process-wide one-time set-up (backend init, thread pools)
                out["fds_after_first"], out["rss_after_first"] = fds(), rss()
            if i == n // 2:
                out["rss_half"] = rss()
        out.update(fds=fds(), maps=maps(), rss=rss())
    elif phase == "drop":
        order = []
        free_ctx, free_model = llama_cpp.llama_free, llama_cpp.llama_model_free
        llama_cpp.llama_free = lambda ctx: (order.append("context"), free_ctx(ctx))[1]
        llama_cpp.llama_model_free = lambda m: (order.append("model"), free_model(m))[1]
        gc.disable()  # what refcounting alone frees
        for i in range(n):
            cap = Captioner.from_pretrained(bundle, n_threads=1, batch_size=2)
            cap.caption_batch([clip, clip], max_new_tokens=2, temperature=0)
            loaded = maps()
            del cap
            out.setdefault("maps_loaded", loaded)
            out.setdefault("maps_after_del", []).append(maps())
        out["order"] = order
    print(json.dumps(out))
""")


def _probe(bundle: Path, clip: Path, phase: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(bundle), str(clip), phase, str(n)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def clip(tiny_assets):
    return tiny_assets.audio["music_24k_mono.wav"]


def _check_rss_growth(res: dict, n: int) -> float:
    growth = (res["rss_end"] - res["rss_start"]) / res["rss_start"]
    mib = [round((s - res["rss_start"]) / 2**20, 2) for s in res["samples"]]
    print(f"RSS {res['rss_start'] / 2**20:.1f} MiB after warm-up; growth over {n} captions "
          f"{100 * growth:.2f} %; MiB above start every {n // 10}: {mib}")
    assert growth < 0.02, mib
    return growth


def test_rss_is_flat_over_500_captions(tiny_bundle, clip):
    _check_rss_growth(_probe(tiny_bundle, clip, "captions", 500), 500)


@pytest.mark.slow
def test_rss_is_flat_over_5000_captions(tiny_bundle, clip):
    _check_rss_growth(_probe(tiny_bundle, clip, "captions", 5000), 5000)


@pytest.mark.parametrize("cycles", [pytest.param(50, id="50"), pytest.param(300, id="300", marks=pytest.mark.slow)])
def test_open_close_cycles_leave_no_native_handles(tiny_bundle, clip, cycles):
    res = _probe(tiny_bundle, clip, "cycles", cycles)
    first, half, last = res["rss_after_first"], res["rss_half"], res["rss"]
    print(f"{cycles} from_pretrained/close cycles: fds {res['fds_after_first']} -> {res['fds']} "
          f"(while open: {res['open_fds']}), bundle maps {res['maps_before']} -> {res['maps']} (while open: "
          f"{res['open_maps']}), RSS after cycle 1 / {cycles // 2} / {cycles}: {first / 2**20:.1f} / "
          f"{half / 2**20:.1f} / {last / 2**20:.1f} MiB ({100 * (last - first) / first:+.1f} %)")
    assert res["open_maps"] >= 1  # the GGUF is memory-mapped while open ...
    assert res["maps"] == res["maps_before"] == 0  # ... and unmapped after every close()
    assert res["fds"] == res["fds_after_first"]
    # Allocator pools settle over the first cycles; after that RSS must stay flat.
    assert last - first < 0.06 * first and last - half < 0.02 * first


def test_dropped_captioner_is_freed_at_once_model_last(tiny_bundle, clip):
    """Without close(): refcounting alone frees everything, contexts before their model.

    The abort callback of LlamaContext used to close over the context itself: every context sat in a
    reference cycle, survived ``del`` until the cyclic GC ran, and the GC could then free the model
    before its contexts (llama_free after llama_model_free).
    """
    res = _probe(tiny_bundle, clip, "drop", 3)
    assert res["maps_loaded"] >= 1 and res["maps_after_del"] == [0, 0, 0]
    assert res["order"] == ["context", "context", "model"] * 3
