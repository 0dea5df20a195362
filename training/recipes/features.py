"""Cache of MERT state means per clip: MERT is frozen, so training never needs to run it twice.

For each clip the cache holds the frame-weighted mean over encoder windows of the per-state time
means, ``(n_states, mert_dim)`` float32, computed exactly as the runtime does it
(:func:`mullama_sdk.audio.iter_windows`, windows of at most 30 s, each window's means weighted by
its frame count). Files in the cache folder:

* ``features.f32`` - raw float32 rows, one ``(n_states, mert_dim)`` block per clip, memory-mapped;
* ``index.json`` - clip name -> row, frame count, sha256 of the audio file and the fingerprint of
  the MERT that computed it (config, weights, window length).

Building is resumable: the index is rewritten (atomically) every few seconds and when the run stops,
rows are written before the index names them, and a clip is recomputed when its file's sha256 or the
MERT fingerprint changed. A run that was killed recomputes at most the clips of its last few seconds.

Difference from the published training (documented, accepted by docs/model.md section 5): the original
recomputed MERT every step with MERT left in train mode, so SpecAugment-style time masking was active
and every step saw a differently masked clip. Cached features are computed in eval mode, without
masking: deterministic, and the same features the runtime computes at inference.

CLI: ``mullama-train features --data train.json --audio-dir DIR --mert-dir DIR --out CACHE``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mullama_sdk.audio import iter_windows
from mullama_sdk.commandline import EXIT_INTERRUPTED, run_command, say_error
from mullama_sdk.constants import MAX_WINDOW_SECONDS, SAMPLE_RATE_HZ
from mullama_sdk.errors import ConfigError
from mullama_sdk.files import atomic_write_text, sha256_file
from training.recipes.data import SILENCE_SECONDS, silence
from training.recipes.distributed import resolve_device
from training.reference.mert import MertEncoder

log = logging.getLogger(__name__)

CACHE_FORMAT = "mullama-feature-cache"
CACHE_FORMAT_VERSION = 1
DATA_FILE = "features.f32"
INDEX_FILE = "index.json"
#: The index is rewritten at least this often while building (seconds).
INDEX_EVERY_SECONDS = 10.0
PROG = "mullama-train features"


def clip_state_means(
    mert: MertEncoder,
    source,
    *,
    sample_rate: int | None = None,
    max_window_seconds: float = MAX_WINDOW_SECONDS,
) -> tuple[np.ndarray, int]:
    """Frame-weighted mean over encoder windows of MERT's per-state time means, and the frame count.

    The same windows as the runtime (:func:`mullama_sdk.audio.iter_windows`) and the same arithmetic
    as :meth:`training.reference.model.MullamaModel.state_means` (float64 accumulation).

    Returns:
        ``(n_states, mert_dim)`` float32 and the total number of MERT frames.
    """
    param = next(mert.parameters())
    total, n_frames = None, 0
    with torch.inference_mode():
        for _start, _stop, window in iter_windows(source, sample_rate, max_window_seconds=max_window_seconds):
            x = torch.from_numpy(np.ascontiguousarray(window)).to(device=param.device, dtype=param.dtype)[None]
            means, frames = mert(x)
            weighted = means[0].double().cpu() * frames
            total = weighted if total is None else total + weighted
            n_frames += frames
    assert total is not None
    return (total / n_frames).float().numpy(), n_frames


def mert_fingerprint(mert: MertEncoder, max_window_seconds: float = MAX_WINDOW_SECONDS) -> str:
    """sha256 (hex, 16 chars) of everything that determines the features: config, weights, windowing."""
    h = hashlib.sha256()
    cfg = mert.hubert.config.to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in ("transformers_version", "_name_or_path")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(json.dumps({"do_normalize": mert.do_normalize, "max_window_seconds": max_window_seconds}).encode())
    for name, t in sorted(mert.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


_SILENCE_SHA = f"silence:{SILENCE_SECONDS:g}s@{SAMPLE_RATE_HZ}"


@dataclass(frozen=True)
class CacheReport:
    """What :func:`update_feature_cache` did."""

    n_clips: int
    n_computed: int
    n_reused: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.n_clips} clips: {self.n_computed} computed, {self.n_reused} reused from the cache "
                f"({self.seconds:.1f} s)")


class FeatureCache:
    """Read access to a cache folder: ``get(name)`` returns a clip's ``(n_states, mert_dim)`` row."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        index = _read_index(self.root)
        if index is None:
            raise ConfigError(f"{self.root} is not a feature cache (no {INDEX_FILE}); build it with "
                              "`mullama-train features`")
        self.index = index
        self.n_states, self.mert_dim = int(index["n_states"]), int(index["mert_dim"])
        self.fingerprint = index.get("mert")
        self.clips: dict[str, dict] = index["clips"]
        row_floats = self.n_states * self.mert_dim
        size = (self.root / DATA_FILE).stat().st_size if (self.root / DATA_FILE).exists() else 0
        n_rows = size // (4 * row_floats)
        bad = [k for k, v in self.clips.items() if v["row"] >= n_rows]
        if bad:
            raise ConfigError(f"{self.root}: {DATA_FILE} is shorter than its index says (clip {bad[0]!r}); "
                              "rebuild the cache")
        self._data = (np.memmap(self.root / DATA_FILE, dtype=np.float32, mode="r",
                                shape=(n_rows, self.n_states, self.mert_dim)) if n_rows else None)

    def keys(self) -> Iterable[str]:
        return self.clips.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.clips

    def get(self, name: str) -> np.ndarray:
        """The clip's state means (a read-only view into the memory map)."""
        try:
            row = self.clips[name]["row"]
        except KeyError:
            raise KeyError(f"clip {name!r} is not in the feature cache {self.root}") from None
        assert self._data is not None
        return self._data[row]

    def n_frames(self, name: str) -> int:
        return int(self.clips[name]["n_frames"])


def _read_index(root: Path) -> dict | None:
    path = root / INDEX_FILE
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if index.get("format") != CACHE_FORMAT or int(index.get("format_version", 0)) > CACHE_FORMAT_VERSION:
        raise ConfigError(f"{path} is not a {CACHE_FORMAT} index of version <= {CACHE_FORMAT_VERSION}")
    return index


def _write_index(root: Path, index: dict) -> None:
    atomic_write_text(root / INDEX_FILE, json.dumps(index, indent=1, sort_keys=True))


def update_feature_cache(
    root: Path,
    mert: MertEncoder,
    clips: Mapping[str, Path | None],
    *,
    max_window_seconds: float = MAX_WINDOW_SECONDS,
    progress: bool = True,
    index_every_seconds: float = INDEX_EVERY_SECONDS,
) -> CacheReport:
    """Make sure ``root`` holds up-to-date features for every clip; compute only what is missing or stale.

    Args:
        root: Cache folder (created if needed).
        mert: The frozen encoder (put it in eval mode and on the device you want first).
        clips: Cache key -> audio file; ``None`` means one second of silence (text-only items).
        max_window_seconds: Encoder window length (part of the fingerprint).
        progress: Show a tqdm progress bar.
        index_every_seconds: How often the index is persisted while building.

    Raises:
        ConfigError: an existing cache of other dimensions (MERT width or depth) in ``root``.
        AudioError: an audio file that cannot be decoded (named).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n_states, dim = mert.n_states, mert.dim
    fingerprint = mert_fingerprint(mert, max_window_seconds)
    index = _read_index(root) or {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION,
                                  "n_states": n_states, "mert_dim": dim, "dtype": "float32", "clips": {}}
    if (int(index["n_states"]), int(index["mert_dim"])) != (n_states, dim):
        raise ConfigError(
            f"{root} caches features of {index['n_states']} states x {index['mert_dim']} (another MERT); "
            f"this MERT gives {n_states} x {dim}: use another cache folder"
        )
    index["mert"] = fingerprint
    entries: dict[str, dict] = index["clips"]
    todo: list[tuple[str, Path | None, str]] = []
    for name, path in clips.items():
        sha = _SILENCE_SHA if path is None else sha256_file(path)
        old = entries.get(name)
        if old is None or old.get("sha256") != sha or old.get("mert") != fingerprint:
            todo.append((name, path, sha))
    row_bytes = 4 * n_states * dim
    data_path = root / DATA_FILE
    data_path.touch(exist_ok=True)
    next_row = max((e["row"] for e in entries.values()), default=-1) + 1
    mert.eval()
    last_saved = time.monotonic()
    done = 0
    try:
        with open(data_path, "r+b") as f, tqdm(total=len(todo), desc="MERT features", unit="clip",
                                                disable=not progress or not todo) as bar:
            for name, path, sha in todo:
                if path is None:
                    means, frames = clip_state_means(mert, silence(), sample_rate=SAMPLE_RATE_HZ,
                                                     max_window_seconds=max_window_seconds)
                else:
                    means, frames = clip_state_means(mert, path, max_window_seconds=max_window_seconds)
                row = entries[name]["row"] if name in entries else next_row
                if row == next_row:
                    next_row += 1
                f.seek(row * row_bytes)
                f.write(np.ascontiguousarray(means, dtype=np.float32).tobytes())
                entries[name] = {"row": row, "n_frames": int(frames), "sha256": sha, "mert": fingerprint,
                                 "source": None if path is None else str(path)}
                done += 1
                bar.update(1)
                if time.monotonic() - last_saved >= index_every_seconds:
                    # Rows reach the disk before the index that names them.
                    f.flush()
                    os.fsync(f.fileno())
                    _write_index(root, index)
                    last_saved = time.monotonic()
            f.flush()
            os.fsync(f.fileno())
    finally:
        # Also on errors and Ctrl-C: what was computed is kept. An entry whose row was written only
        # partly cannot be named here (its entry is added after the write completes).
        _write_index(root, index)
    report = CacheReport(len(clips), done, len(clips) - len(todo), time.perf_counter() - t0)
    log.info("feature cache %s: %s", root, report)
    return report


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG,
                                description="Compute (or complete) the MERT feature cache of a MusicQA-format JSON.")
    p.add_argument("--data", required=True, nargs="+", type=Path, help="MusicQA-format JSON file(s)")
    p.add_argument("--audio-dir", type=Path, help="folder the audio_name entries are relative to "
                   "(default: the JSON's folder)")
    p.add_argument("--mert-dir", required=True, type=Path, help="MERT folder (config.json, weights)")
    p.add_argument("--out", required=True, type=Path, help="cache folder (created; resumed when it exists)")
    p.add_argument("--max-window-seconds", type=float, default=MAX_WINDOW_SECONDS)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_mert(mert_dir: Path, *, trust_pickle: bool = False) -> MertEncoder:
    """A frozen MERT from a MERT folder (config.json + weights), in eval mode."""
    from training.reference.loading import read_mert_weights
    from training.reference.mert import hubert_config_from_mert, read_mert_folder

    raw, do_normalize = read_mert_folder(Path(mert_dir))
    mert = MertEncoder(hubert_config_from_mert(raw, source=str(mert_dir)), do_normalize=do_normalize)
    mert.load_weights(read_mert_weights(Path(mert_dir), trust_pickle))
    mert.requires_grad_(False)
    return mert.eval()


def main(argv: list[str] | None = None) -> int:
    """``mullama-train features``: errors raised here are reported by :mod:`mullama_sdk.commandline`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from training.recipes.data import clip_paths, load_qa_json

    try:
        clips: dict[str, Path | None] = {}
        for data in args.data:
            clips.update(clip_paths(load_qa_json(data), args.audio_dir or data.parent))
        mert = load_mert(args.mert_dir).to(resolve_device(args.device, setting="--device"))
        report = update_feature_cache(args.out, mert, clips, max_window_seconds=args.max_window_seconds,
                                      progress=not args.no_progress)
    except KeyboardInterrupt:
        say_error(PROG, "interrupted: the cache keeps what was computed; run the same command to continue")
        return EXIT_INTERRUPTED
    print(f"{args.out}: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(PROG, main, sys.argv[1:]))
