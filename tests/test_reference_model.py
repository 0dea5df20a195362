"""The torch reference against the spec's math (not against itself), on the tiny generated assets.

Hand computations are float64 numpy; the model runs float32, so tolerances are float32-sized.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mullama_sdk.constants import SAMPLE_RATE_HZ
from training.reference.build import load_reference
from training.reference.llama import Llama


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _clip(assets, stem: str):
    for key, path in assets.audio.items():
        if key == stem or str(key).startswith(stem) or path.stem == stem:
            return path
    raise KeyError(f"no test clip {stem!r} in {sorted(assets.audio)}")


@pytest.fixture(scope="module")
def model(tiny_assets):
    return load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir)


def _rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def test_adapter_matches_hand_computation(model):
    torch.manual_seed(1)
    d = model.config.adapter
    h = torch.randn(d.n_states, d.mert_dim)
    a = model.music_query(h)[0]

    ad = model.adapter
    mix_w = _np(ad.layer_mix.weight).reshape(-1)  # [1, n_states, 1] -> (n_states,)
    e = mix_w @ _np(h) + _np(ad.layer_mix.bias)[0]
    u = e / max(np.linalg.norm(e), 1e-12)
    z = _np(ad.proj.weight) @ u + _np(ad.proj.bias)
    for blk in ad.blocks:
        n = _rmsnorm(z, _np(blk.norm.weight), 1e-6)
        g = _np(blk.w1.weight) @ n
        z = z + _np(blk.w2.weight) @ ((g / (1 + np.exp(-g))) * (_np(blk.w3.weight) @ n))
    np.testing.assert_allclose(_np(a), z, rtol=1e-4, atol=1e-5)


def test_mert_states_follow_spec(model):
    """State 0 = projection + positional conv; last state = final LayerNorm of the last layer."""
    torch.manual_seed(2)
    wave = torch.randn(1, SAMPLE_RATE_HZ) * 0.1
    mert = model.mert
    with torch.no_grad():
        states = mert.hidden_states(wave)
        ref = mert.hubert(wave, output_hidden_states=True)
    assert len(states) == mert.n_states == model.config.adapter.n_states
    hub = mert.hubert
    with torch.no_grad():
        proj = hub.feature_projection(hub.feature_extractor(wave).transpose(1, 2))
        proj = proj[0] if isinstance(proj, tuple) else proj
        s0 = proj + hub.encoder.pos_conv_embed(proj)
        last = hub.encoder.layer_norm(hub.encoder.layers[-1](states[-2]))
        last = last[0] if isinstance(last, tuple) else last
    torch.testing.assert_close(states[0], s0)
    torch.testing.assert_close(states[-1], last)
    torch.testing.assert_close(states[-1], ref.last_hidden_state)
    # 75 frames per second at 24 kHz (320x downsampling, minus the conv stack's edge).
    assert states[0].shape[1] == 74


def test_time_mean_and_window_weighting(model):
    """Long audio: frame-weighted mean of per-window time-means (windows <= max_window_seconds)."""
    rng = np.random.default_rng(3)
    wave = (rng.standard_normal(int(2.6 * SAMPLE_RATE_HZ)) * 0.1).astype(np.float32)
    means, frames = model.state_means(wave, max_window_seconds=1.0)  # 3 windows of ~0.87 s
    per = []
    for chunk in np.array_split(wave, 3):
        with torch.no_grad():
            st = model.mert.hidden_states(torch.from_numpy(chunk)[None])
        per.append((np.stack([_np(s[0]).mean(0) for s in st]), st[0].shape[1]))
    expect = sum(m * n for m, n in per) / sum(n for _, n in per)
    assert frames == sum(n for _, n in per)
    np.testing.assert_allclose(_np(means), expect, rtol=1e-5, atol=1e-6)


def test_injected_layer_equals_closed_form(model):
    """h + attn(h) + Wo'(tanh(g) * Wv(a + p)) for an injected layer (query_len 1)."""
    torch.manual_seed(4)
    p = model.config.llama
    l = model.inject_layers[0]
    a = torch.randn(1, p.dim)
    tokens = model.adapter_tokens(a)[l]  # p_l + a
    attn = model.llama.layers[l].attention
    x = torch.randn(1, 5, p.dim)
    from training.reference.llama import rope_angles

    rot = rope_angles(p.head_dim, torch.arange(5), p.rope_theta)
    with torch.no_grad():
        with_music = attn(x, 0, rot, None, tokens)
        without = attn(x, 0, rot, None, None)
    wv = _np(attn.wv.weight)  # base weight: no LoRA, no bias
    gate = np.tanh(_np(attn.gate).reshape(-1))  # one per head
    c = (wv @ _np(tokens[0, 0])).reshape(p.n_heads, p.head_dim) * gate[:, None]
    wo_merged = _np(attn.wo.weight) + _np(attn.lora_wo_l2.weight) @ _np(attn.lora_wo_l1.weight)
    d = wo_merged @ c.reshape(-1)
    np.testing.assert_allclose(_np(with_music - without), np.broadcast_to(d, (1, 5, p.dim)), atol=2e-5)
    # The export's folded vectors are the same thing.
    np.testing.assert_allclose(_np(model.injection_vectors(a)[0]), d, atol=2e-5)
    assert np.abs(d).max() > 1e-2, "test is vacuous: the injection is ~0"


def test_general_query_len_softmax_path(model):
    """query_len > 1: per position, tanh(g) * softmax(q k_a^T / sqrt(hd)) v_a with base Wk, Wv."""
    torch.manual_seed(5)
    p = model.config.llama
    attn = model.llama.layers[-1].attention
    adapter = torch.randn(1, 3, p.dim)
    q = torch.randn(1, p.n_heads, 4, p.head_dim)
    with torch.no_grad():
        got = attn.music_term(adapter, q)
    wk, wv = _np(attn.wk.weight), _np(attn.wv.weight)
    gate = np.tanh(_np(attn.gate).reshape(-1))
    k_a = (_np(adapter[0]) @ wk.T).reshape(3, p.n_heads, p.head_dim)
    v_a = (_np(adapter[0]) @ wv.T).reshape(3, p.n_heads, p.head_dim)
    qn = _np(q[0])
    want = np.empty((p.n_heads, 4, p.head_dim))
    for h in range(p.n_heads):
        s = qn[h] @ k_a[:, h].T / np.sqrt(p.head_dim)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        want[h] = gate[h] * (w @ v_a[:, h])
    np.testing.assert_allclose(_np(got[0]), want, atol=2e-5)


def test_merged_lora_gives_same_logits(model):
    """W + L2 @ L1 in a LoRA-free copy reproduces the unmerged model's logits."""
    from training.reference.dims import DeltaDims

    src = model.llama
    merged = Llama(model.config.llama, DeltaDims(bias=True, lora_rank=0))
    sd = {}
    for k, v in src.state_dict().items():
        if "lora_" in k:
            continue
        sd[k] = v.clone()
    for k in list(sd):
        name = k.rsplit(".", 2)
        if len(name) == 3 and name[2] == "weight" and name[1] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            l1 = src.state_dict()[f"{name[0]}.lora_{name[1]}_l1.weight"]
            l2 = src.state_dict()[f"{name[0]}.lora_{name[1]}_l2.weight"]
            sd[k] = sd[k] + l2 @ l1
    merged.load_state_dict(sd, strict=True)
    tokens = torch.tensor([[1, 5, 9, 33, 7, 100, 3]])
    a = torch.randn(1, model.config.llama.dim)
    # Music injection must use the UN-merged Wv (docs/model.md section 2), so compare without music.
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), src(tokens), rtol=1e-4, atol=1e-4)
        diff = (src(tokens, adapters=model.adapter_tokens(a)) - src(tokens)).abs().max()
    assert diff > 1e-3, "music must change the logits of the tiny model"


def test_kv_cache_equals_full_forward(model):
    torch.manual_seed(6)
    a = model.music_query(torch.randn(model.config.adapter.n_states, model.config.adapter.mert_dim))
    ad = model.adapter_tokens(a)
    tokens = [1, 40, 41, 42, 43, 44, 45, 46, 47]
    with torch.no_grad():
        full = model.llama(torch.tensor([tokens]), adapters=ad)[0]
        cache = model.llama.new_cache(1, len(tokens))
        step = [model.llama(torch.tensor([tokens[:5]]), 0, cache=cache, adapters=ad)[0]]
        for i in range(5, len(tokens)):
            step.append(model.llama(torch.tensor([[tokens[i]]]), i, cache=cache, adapters=ad)[0])
    torch.testing.assert_close(torch.cat(step), full, rtol=1e-4, atol=1e-4)


def test_prompt_tokens_are_bos_plus_sentencepiece(model):
    from mullama_sdk.prompt import format_prompt

    tok = model.tokenizer
    ids = tok.encode_prompt("Describe the audio")
    assert ids[0] == 1 and ids[1:] == tok.encode(format_prompt("Describe the audio"))
    # Identity normaliser + kept whitespace: the prompt survives a round trip byte for byte.
    assert tok.decode(ids[1:]) == format_prompt("Describe the audio")


def test_generate_is_deterministic_and_bounded(model, tiny_assets):
    clip = _clip(tiny_assets, "music_24k_mono")
    g1 = model.generate(clip, "Describe the audio", max_new_tokens=12, temperature=0)
    g2 = model.generate(clip, "Describe the audio", max_new_tokens=12, temperature=0)
    assert g1 == g2
    assert len(g1.tokens) <= 12 and (g1.stopped_at_eos or len(g1.tokens) == 12)
    assert g1.text == model.tokenizer.decode(g1.tokens)
    # Greedy = argmax of the full (uncached) forward at every step.
    wave_a = model.music_query(model.state_means(__import__("mullama_sdk.audio").audio.load_audio(clip))[0])
    seq = list(g1.prompt_tokens)
    for t in g1.tokens:
        with torch.no_grad():
            assert int(model.logits(seq, wave_a)[-1].argmax()) == t
        seq.append(t)
    s1 = model.generate(clip, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    s2 = model.generate(clip, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    assert s1.tokens == s2.tokens


def test_generate_stops_at_eos(tiny_assets):
    model = load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir)
    clip = _clip(tiny_assets, "music_24k_mono")
    first = model.generate(clip, max_new_tokens=1, temperature=0).tokens[0]
    # Make EOS's output row a scaled copy of the greedy token's: its logit becomes 3x the winning one.
    with torch.no_grad():
        w = model.llama.output.weight
        w[model.tokenizer.eos_id] = 3 * w[first]
    g = model.generate(clip, max_new_tokens=5, temperature=0)
    assert g.tokens == [] and g.stopped_at_eos
    assert model.generate(clip, max_new_tokens=0, temperature=0).tokens == []


def test_different_clips_give_different_music(model, tiny_assets):
    from mullama_sdk.audio import load_audio

    a1 = model.music_query(model.state_means(load_audio(_clip(tiny_assets, "music_24k_mono")))[0])
    a2 = model.music_query(model.state_means(load_audio(_clip(tiny_assets, "music_44k_stereo")))[0])
    assert (a1 - a2).abs().max() > 1e-3
