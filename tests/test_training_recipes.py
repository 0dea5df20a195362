"""Training recipes on the tiny model: golden losses cross-checked by hand, overfitting, exact resume.

The golden numbers were computed once on this machine (CPU, fp32) and are reproducible run to run.
They are only meaningful because the first step's loss is also checked against an independent
computation: the answer-token cross-entropy from :meth:`MullamaModel.logits`, with the music query
computed from the audio by :meth:`MullamaModel.state_means` (not from the feature cache), on
hand-built token sequences, in float64.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mullama_sdk.audio import load_audio
from mullama_sdk.errors import CheckpointError, ConfigError
from training.recipes.config import load_recipe_config
from training.recipes.data import load_qa_json, silence
from training.recipes.objective import TrainForward
from training.recipes.parameters import decays, saved_names, trainable_names
from training.recipes.schedule import WarmupCosine
from training.recipes.stages import FinetuneRecipe, PretrainRecipe
from training.reference.build import load_reference
from training.reference.loading import torch_load

ROOT = Path(__file__).parents[1]
TINY_YAML = ROOT / "training" / "configs" / "tiny.yaml"
TINY_JSON = ROOT / "training" / "configs" / "tiny_musicqa.json"

# Three optimizer steps of 4 examples each (lr 1e-3, warm-up 1, wd 0.05, seed 0), computed once.
GOLDEN_PRETRAIN = [6.931454, 6.931155, 6.930569]
GOLDEN_FINETUNE = [6.873060, 6.770386, 6.668843]


def tiny_config(assets, out: Path, stage: str, *overrides: str, cache: Path | None = None):
    """The tiny YAML config pointed at the generated assets (paths overridden as a user would)."""
    base = [f"output_dir={out}", f"model.llama_dir={assets.llama_dir}", f"model.mert_dir={assets.mert_dir}",
            f"data.train_json={TINY_JSON}", f"data.audio_dir={assets.root / 'audio'}",
            f"data.feature_cache={cache or out / 'features'}"]
    return load_recipe_config(TINY_YAML, [*base, *overrides], stage=stage)


def run_recipe(cfg):
    recipe = {"pretrain": PretrainRecipe, "finetune": FinetuneRecipe}[cfg.stage](cfg, progress=False)
    with recipe:
        recipe.setup()
        return recipe.train()


def hand_loss(model, assets) -> float:
    """Mean over the tiny pairs of the mean answer-token (+EOS) NLL, from model.logits, in float64."""
    tok = model.tokenizer
    per_pair = []
    for pair in load_qa_json(TINY_JSON):
        wave = silence() if pair.audio_name is None else load_audio(assets.root / "audio" / pair.audio_name)
        prompt = tok.encode_prompt(pair.question)
        answer = [*tok.encode(pair.answer), tok.eos_id]
        with torch.no_grad():
            a = model.music_query(model.state_means(wave)[0])
            logp = torch.log_softmax(model.logits(prompt + answer, a).double(), dim=-1)
        nll = [-float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer)]
        per_pair.append(sum(nll) / len(nll))
    return sum(per_pair) / len(per_pair)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


def _golden_run(cfg, assets):
    recipe = {"pretrain": PretrainRecipe, "finetune": FinetuneRecipe}[cfg.stage](cfg, progress=False)
    with recipe:
        recipe.setup()
        expected_first = hand_loss(recipe.model, assets)
        summary = recipe.train()
    return summary, expected_first


def test_pretrain_golden_losses(tiny_assets, tmp_path, cache):
    cfg = tiny_config(tiny_assets, tmp_path / "run", "pretrain", cache=cache)
    summary, first = _golden_run(cfg, tiny_assets)
    assert summary.steps == 3
    # Independent check of step 1 (the gates start at 0, so this is the frozen LLaMA's text loss).
    assert abs(summary.losses[0] - first) < 1e-5, (summary.losses[0], first)
    assert summary.losses == pytest.approx(GOLDEN_PRETRAIN, abs=1e-4), summary.losses


def test_finetune_golden_losses(tiny_assets, tmp_path, cache):
    # From the generated MU-LLaMA deltas: music is active from step 1 (non-zero gates), so the hand
    # check also covers the cached features, the adapter and the injection.
    cfg = tiny_config(tiny_assets, tmp_path / "run", "finetune", f"model.init_checkpoint={tiny_assets.checkpoint_deltas}",
                      cache=cache)
    summary, first = _golden_run(cfg, tiny_assets)
    assert abs(summary.losses[0] - first) < 1e-5, (summary.losses[0], first)
    assert summary.losses == pytest.approx(GOLDEN_FINETUNE, abs=1e-4), summary.losses


def test_train_forward_batches_like_single_examples(tiny_assets, reference_model):
    """Right padding and batching change nothing: the batched loss equals per-example sums from model.logits."""
    from training.recipes.data import collate, encode_pair

    model = reference_model
    tok = model.tokenizer
    torch.manual_seed(0)
    d = model.config.adapter
    means = torch.randn(2, d.n_states, d.mert_dim)
    encs = [encode_pair(tok, "Describe the audio", "A slow piece.", 96),
            encode_pair(tok, "What do you hear in the audio?", "Drums and a bright melody in a major key.", 96)]
    batch = collate([{"state_means": m, "tokens": torch.tensor(e.tokens), "labels": torch.tensor(e.labels)}
                     for m, e in zip(means, encs)])
    with torch.no_grad():
        loss_sum, count = TrainForward(model)(batch["state_means"], batch["tokens"], batch["labels"])
        want_sum, want_count = 0.0, 0
        for m, e in zip(means, encs):
            logp = torch.log_softmax(model.logits(e.tokens, model.music_query(m)).double(), dim=-1)
            for t in range(1, len(e.tokens)):
                if e.labels[t] != -100:
                    want_sum -= float(logp[t - 1, e.labels[t]])
                    want_count += 1
    assert int(count) == want_count
    assert float(loss_sum) == pytest.approx(want_sum, rel=1e-5)


def test_loss_falls_when_overfitting(tiny_assets, tmp_path, cache):
    for stage, extra in (("pretrain", []), ("finetune", [f"model.init_checkpoint={tiny_assets.checkpoint_deltas}"])):
        cfg = tiny_config(tiny_assets, tmp_path / stage, stage, "train.max_steps=50", "train.grad_accum=1",
                          "optim.lr=1e-2", *extra, cache=cache)
        losses = run_recipe(cfg).losses
        assert len(losses) == 50 and all(math.isfinite(x) for x in losses)
        first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
        if stage == "pretrain":  # adapter + gates on a frozen random LLaMA: a clear but limited drop
            assert last < first - 0.5, (stage, first, last)
        else:
            assert last < 0.5 * first, (stage, first, last)


def test_resume_equals_uninterrupted(tiny_assets, tmp_path, cache):
    # Two steps per epoch (4 examples, accumulation 2), so the resumed part crosses epoch boundaries
    # (reshuffled order); warm-up, clipping and weight decay are all active.
    common = ["train.max_steps=6", "train.grad_accum=2", "optim.warmup_steps=2", "optim.clip_grad_norm=0.05",
              "optim.lr=5e-3", "train.save_every=3", "train.keep_last=0"]
    for stage, extra in (("pretrain", []), ("finetune", [f"model.init_checkpoint={tiny_assets.checkpoint_deltas}"])):
        full = run_recipe(tiny_config(tiny_assets, tmp_path / f"{stage}-full", stage, *common, *extra, cache=cache))
        resumed_dir = tmp_path / f"{stage}-resumed"
        resumed_dir.mkdir()
        shutil.copy(tmp_path / f"{stage}-full" / "checkpoint-000003.pth", resumed_dir)
        resumed = run_recipe(tiny_config(tiny_assets, resumed_dir, stage, *common, *extra, "resume=auto", cache=cache))
        assert resumed.losses == full.losses  # bit for bit, including the restored history of steps 1-3
        a = torch_load(tmp_path / f"{stage}-full" / "checkpoint-000006.pth")
        b = torch_load(resumed_dir / "checkpoint-000006.pth")
        assert a["model"].keys() == b["model"].keys()
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key
        assert a["data"] == b["data"]


def test_checkpoint_is_self_describing(tiny_assets, tmp_path, cache):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_assets, out, "pretrain", "train.max_steps=2", "save_published=true", cache=cache)
    run_recipe(cfg)
    raw = torch_load(out / "checkpoint-000002.pth")  # weights_only: tensors and plain containers only
    assert raw["format"] == "mullama-checkpoint" and raw["stage"] == "pretrain" and raw["step"] == 2
    assert {"optimizer", "scheduler", "rng", "data", "history", "recipe", "config"} <= set(raw)
    assert raw["config"]["deltas"] == {"bias": False, "lora_rank": 0}
    assert raw["data"]["micro_index"] == 8
    assert not any("lora" in k or k.endswith(".bias") and k.startswith("llama.") for k in raw["model"])
    log = json.loads((out / "log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2] and (out / "loss.png").stat().st_size > 1000
    assert (out / "config.yaml").read_text().startswith("# mullama-train pretrain --config ")
    assert (out / "checkpoint-last.pth").resolve() == (out / "checkpoint-000002.pth").resolve()
    # The published-layout copy loads to the same model as ours.
    ours = load_reference(out / "checkpoint-000002.pth", tiny_assets.llama_dir, tiny_assets.mert_dir)
    pub = load_reference(out / "checkpoint-000002.published.pth", tiny_assets.llama_dir, tiny_assets.mert_dir)
    assert torch.load(out / "checkpoint-000002.published.pth", weights_only=False).keys() >= {"model", "args"}
    tokens = ours.tokenizer.encode_prompt("Describe the audio")
    a = torch.randn(1, ours.config.llama.dim)
    with torch.no_grad():
        assert torch.equal(ours.logits(tokens, a), pub.logits(tokens, a))


def test_parameter_sets(reference_model):
    m = reference_model
    pre = set(trainable_names(m, "pretrain"))
    assert pre == {n for n, _ in m.named_parameters() if n.startswith(("adapter.", "prefix_query."))} | {
        f"llama.layers.{l}.attention.gate" for l in m.inject_layers}
    fine = set(trainable_names(m, "finetune"))
    assert all(n.startswith("llama.") for n in fine)
    assert {"llama.norm.weight", "llama.layers.0.attention.wq.bias", "llama.layers.0.feed_forward.lora_w2_l1.weight",
            "llama.layers.3.ffn_norm.weight"} <= fine
    assert not any(n.endswith(("wk.bias", "wv.bias", ".gate")) or "tok_embeddings" in n or "output" in n for n in fine)
    assert set(saved_names(m, "finetune")) == pre | fine | {f"llama.layers.{l}.attention.gate" for l in range(4)}
    params = dict(m.named_parameters())
    assert decays(params["adapter.proj.weight"]) and decays(params["llama.layers.0.attention.lora_wq_l1.weight"])
    assert not decays(params["llama.layers.3.attention.gate"])  # (1, heads, 1, 1): a vector
    assert not decays(params["adapter.layer_mix.weight"])  # (1, n_states, 1): a vector
    assert not decays(params["llama.norm.weight"]) and not decays(params["llama.layers.0.attention.wq.bias"])


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup=2, total=10, min_ratio=0.1)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.1) and all(f(s) >= f(s + 1) for s in range(2, 12))


def test_config_errors_name_the_key(tiny_assets, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) optim.learning_rate; valid: optim.lr"):
        tiny_config(tiny_assets, tmp_path, "pretrain", "optim.learning_rate=1")
    with pytest.raises(ConfigError, match="train.precision='fp8'; valid: fp32, bf16, fp16"):
        tiny_config(tiny_assets, tmp_path, "pretrain", "train.precision=fp8")
    with pytest.raises(ConfigError, match="finetune needs model.init_checkpoint"):
        tiny_config(tiny_assets, tmp_path, "finetune")
    with pytest.raises(ConfigError, match="train.max_steps='many': expected"):
        tiny_config(tiny_assets, tmp_path, "pretrain", "train.max_steps=many")
    with pytest.raises(ConfigError, match="needs train.precision bf16 or fp16"):
        tiny_config(tiny_assets, tmp_path, "pretrain", "model.base_dtype=bfloat16")


def test_pretrain_refuses_a_checkpoint_with_deltas(tiny_assets, tmp_path, cache):
    cfg = tiny_config(tiny_assets, tmp_path, "pretrain", f"model.init_checkpoint={tiny_assets.checkpoint}", cache=cache)
    with pytest.raises(CheckpointError, match="finetune deltas"):
        run_recipe(cfg)


def test_recipe_enforces_call_order(tiny_assets, tmp_path):
    recipe = PretrainRecipe(tiny_config(tiny_assets, tmp_path, "pretrain"))
    with pytest.raises(RuntimeError, match="call setup"):
        recipe.train()
    with pytest.raises(ConfigError, match="runs stage 'finetune'"):
        FinetuneRecipe(tiny_config(tiny_assets, tmp_path, "pretrain"))


def test_bf16_autocast_on_cpu(tiny_assets, tmp_path, cache):
    """bf16 autocast with bf16 frozen LLaMA matrices runs and stays close to fp32 (first step)."""
    init = f"model.init_checkpoint={tiny_assets.checkpoint_deltas}"
    one = ("train.max_steps=1", "train.grad_accum=1")
    fp32 = run_recipe(tiny_config(tiny_assets, tmp_path / "fp32", "finetune", init, *one, cache=cache)).losses[0]
    bf16 = run_recipe(tiny_config(tiny_assets, tmp_path / "bf16", "finetune", init, *one, "train.precision=bf16",
                                  "model.base_dtype=bfloat16", cache=cache)).losses[0]
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != fp32
    raw = torch_load(tmp_path / "bf16" / "checkpoint-000001.pth")
    assert raw["model"]["llama.layers.0.attention.lora_wq_l1.weight"].dtype == torch.float32


def test_shipped_configs_parse_and_name_their_launch_command():
    for stage in ("pretrain", "finetune"):
        path = ROOT / "training" / "configs" / f"{stage}.yaml"
        assert path.read_text().startswith(f"# mullama-train {stage} --config training/configs/{stage}.yaml\n")
        cfg = load_recipe_config(path, stage=stage)
        assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.05 and cfg.train.batch_size == 1
        assert (cfg.train.grad_accum, cfg.data.max_words) == ((4, 96) if stage == "pretrain" else (32, 512))
    assert TINY_YAML.read_text().startswith("# python -m testkit.make_assets /tmp/mullama-tiny && mullama-train")
