"""Two CPU processes under torchrun (gloo): DDP + DistributedSampler give the single-process losses.

4 examples; one process accumulates 4 micro-batches per step, two processes accumulate 2 each and
DDP averages their gradients: every step sees the same 4 examples, so the losses agree to float
rounding. Only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_training_recipes import TINY_JSON, TINY_YAML, run_recipe, tiny_config

ROOT = Path(__file__).parents[1]


def test_two_process_gloo_matches_one_process(tiny_assets, tmp_path):
    cache = tmp_path / "features"
    single = run_recipe(tiny_config(tiny_assets, tmp_path / "single", "pretrain", "optim.lr=1e-2", cache=cache))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training", "pretrain", "--config", str(TINY_YAML), "--no-progress",
           f"output_dir={out}", f"model.llama_dir={tiny_assets.llama_dir}", f"model.mert_dir={tiny_assets.mert_dir}",
           f"data.train_json={TINY_JSON}", f"data.audio_dir={tiny_assets.root / 'audio'}",
           f"data.feature_cache={cache}", "optim.lr=1e-2", "train.grad_accum=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("pretrain: 3 steps") == 1  # rank 0 only
    log = json.loads((out / "log.json").read_text())
    losses = [s["loss"] for s in log["steps"]]
    assert losses == pytest.approx(single.losses, abs=1e-5)
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-000003.pth", "checkpoint-last.pth"]
