"""The demo model: the committed bundle is valid, small and describes music; its pipeline runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "examples" / "demo_bundle"
CLIPS = ROOT / "examples" / "clips"


def test_committed_bundle_is_valid_and_under_budget():
    from examples.demo_model.train import MAX_BUNDLE_MB
    from mullama_sdk.bundle_files import check_files
    from mullama_sdk.manifest import load_manifest

    manifest = load_manifest(BUNDLE)
    raw = json.loads((BUNDLE / "mullama.json").read_text())
    check_files(BUNDLE, manifest, sorted(raw["files"]), sha256=True)
    assert sorted(raw["files"]) == sorted(f.name for f in BUNDLE.iterdir() if f.name != "mullama.json")
    size_mb = sum(f.stat().st_size for f in BUNDLE.iterdir()) / 2**20
    assert size_mb < MAX_BUNDLE_MB
    assert raw["created"].startswith("2026-01-01"), "the demo bundle is a reproducible build (SOURCE_DATE_EPOCH)"
    failed = [name for name, row in manifest.verification.items() if not row["passed"]]
    assert not failed, f"export verification failed for {failed}"


def test_demo_names_the_instrument_family_of_example_clips():
    """Held-out example clips: the caption names the right family for most of them, and the captions
    differ between clips (the music steers the text)."""
    from examples.demo_model.data import FAMILIES, first_mentioned
    from mullama_sdk import Captioner

    facts = {f["clip_id"]: f for f in json.loads((CLIPS / "clips.json").read_text())}
    captions = {}
    with Captioner.from_pretrained(BUNDLE, n_threads=2) as cap:
        for clip_id in sorted(facts):
            captions[clip_id] = cap.caption(CLIPS / f"{clip_id}.wav", max_new_tokens=48, temperature=0).text
    right = [c for c, text in captions.items() if first_mentioned(text, FAMILIES) == facts[c]["family"]]
    assert len(set(captions.values())) == len(captions), captions
    # 5 clips of 5 families; chance is 1/7 per clip.
    assert len(right) >= 3, captions


def test_make_demo_script_runs():
    proc = subprocess.run([sys.executable, "-m", "examples.demo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for clip in CLIPS.glob("*.wav"):
        assert clip.name in proc.stdout
    assert "tok/s" in proc.stdout and "\nA: " in proc.stdout


def test_demo_script_without_bundle_says_how_to_get_one(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "examples.demo", "--bundle", str(tmp_path / "none")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "make demo-model" in proc.stderr


def test_training_pipeline_runs_every_stage(tmp_path):
    """Data -> encoder -> LM -> pretrain -> finetune -> verified bundle, on a few clips for a few steps."""
    from examples.demo_model.train import Budget, run
    from mullama_sdk import Captioner

    bundle = tmp_path / "bundle"
    seconds = run(tmp_path / "work", bundle, budget=Budget.smoke())
    assert list(seconds) == ["data", "encoder", "lm", "pretrain", "finetune", "export"]
    with Captioner.from_pretrained(bundle, n_threads=2) as cap:
        clip = next((tmp_path / "work" / "data" / "audio").glob("*.wav"))
        res = cap.caption(clip, max_new_tokens=4, temperature=0)
    assert res.timings.n_tokens >= 1


def test_demo_eval_significance():
    from math import isclose

    from examples.demo_model.evaluate import p_at_least

    assert p_at_least(0, 98, 0.337) == 1.0
    assert isclose(p_at_least(10, 10, 0.5), 0.5**10)
    assert isclose(p_at_least(2, 3, 0.5), 0.5)                   # 3 of 8 outcomes have 2 hits, 1 has 3
    assert p_at_least(46, 98, 0.337) < 0.01 < p_at_least(40, 98, 0.337)


def test_demo_scripts_print_typed_errors_without_traceback(tmp_path, capsys):
    from examples.demo_model.cli import run_main
    from mullama_sdk.errors import BundleError

    def broken(argv):
        raise BundleError("manifest version 9 is newer than this SDK (reads 1)")

    assert run_main(broken) == 2
    assert capsys.readouterr().err == "error: manifest version 9 is newer than this SDK (reads 1)\n"

    def bug(argv):
        raise KeyError("x")

    with pytest.raises(KeyError):                                # a bug keeps its traceback
        run_main(bug)
    proc = subprocess.run([sys.executable, "-m", "examples.demo_model.evaluate", "--bundle", str(tmp_path / "none"),
                           "--data", str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "make demo-model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()                      # the bundle is checked before rendering
