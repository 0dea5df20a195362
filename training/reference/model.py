"""MU-LLaMA end to end in torch: the yardstick every exported stage is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mullama_sdk.audio import load_audio, window_bounds
from mullama_sdk.constants import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_WINDOW_SECONDS,
    MIN_WINDOW_SAMPLES,
    SAMPLE_RATE_HZ,
)
from mullama_sdk.sampling import Sampler
from training.reference.adapter import MusicAdapter
from training.reference.dims import MullamaConfig
from training.reference.llama import Llama
from training.reference.mert import MertEncoder, hubert_config_from_mert
from training.reference.tokenizer import Tokenizer


@dataclass(frozen=True)
class Generation:
    """Result of :meth:`MullamaModel.generate`. ``tokens`` excludes the EOS that ended it."""

    tokens: list[int]
    text: str
    prompt_tokens: list[int]
    stopped_at_eos: bool


class MullamaModel(nn.Module):
    """MERT + music adapter + prefix queries + LLaMA with deltas (docs/model.md sections 1-2).

    Build it through :func:`training.reference.build.load_reference`; the constructor only allocates.
    """

    def __init__(self, config: MullamaConfig) -> None:
        super().__init__()
        self.config = config
        self.mert = MertEncoder(hubert_config_from_mert(config.mert), do_normalize=config.mert_do_normalize)
        self.adapter = MusicAdapter(config.adapter)
        inj = config.injection
        self.prefix_query = nn.Embedding(inj.n_layers * inj.query_len, config.llama.dim)
        self.llama = Llama(config.llama, config.deltas)
        self.inject_layers = inj.layer_ids(config.llama.n_layers)
        self.tokenizer: Tokenizer | None = None

    # ---- audio -> music query -------------------------------------------------------------------
    def state_means(
        self, waveform: np.ndarray, *, max_window_seconds: float = MAX_WINDOW_SECONDS
    ) -> tuple[torch.Tensor, int]:
        """Frame-weighted mean over windows of the per-state time-means: ``(n_states, mert_dim)``, frames.

        Args:
            waveform: Mono float32 at 24 kHz (see :func:`mullama_sdk.audio.load_audio`).
            max_window_seconds: Longest window MERT sees at once.
        """
        bounds = window_bounds(
            len(waveform),
            max_window_samples=int(max_window_seconds * SAMPLE_RATE_HZ),
            min_window_samples=MIN_WINDOW_SAMPLES,
        )
        dtype = next(self.mert.parameters()).dtype
        total, n_frames = None, 0
        for start, end in bounds:
            window = torch.from_numpy(np.ascontiguousarray(waveform[start:end])).to(dtype)[None]
            means, frames = self.mert(window)
            weighted = means[0].double() * frames
            total = weighted if total is None else total + weighted
            n_frames += frames
        return (total / n_frames).float(), n_frames

    def music_query(self, state_means: torch.Tensor) -> torch.Tensor:
        """``a``: ``(1, dim)`` from ``(n_states, mert_dim)``."""
        adapter_dtype = next(self.adapter.parameters()).dtype
        return self.adapter(state_means[None].to(adapter_dtype))

    def adapter_tokens(self, a: torch.Tensor) -> dict[int, torch.Tensor]:
        """Layer -> ``p_l + a`` tokens ``(batch, query_len, dim)`` for every injected layer."""
        inj = self.config.injection
        prefix = self.prefix_query.weight.view(inj.n_layers, inj.query_len, -1)
        dtype = self.llama.output.weight.dtype
        return {l: (prefix[i][None] + a[:, None, :]).to(dtype) for i, l in enumerate(self.inject_layers)}

    def injection_vectors(self, a: torch.Tensor) -> torch.Tensor:
        """``d_l = Wo'_l c_l`` per injected layer, ``(n_inject, dim)`` float32 (query_len 1 only).

        This is what the runtime adds to ``attn_out-<l>``; ``Wo'`` is wo with its LoRA merged, no bias.
        """
        if self.config.injection.query_len != 1:
            raise ValueError("constant injection vectors exist only for query_len == 1")
        out = []
        for l, tokens in self.adapter_tokens(a).items():
            attn = self.llama.layers[l].attention
            c = attn.music_term(tokens)  # (1, heads, 1, head_dim)
            c = c.reshape(1, -1).float()
            wo = attn.wo.weight.float()
            if self.config.deltas.lora_rank:
                wo = wo + attn.lora_wo_l2.weight.float() @ attn.lora_wo_l1.weight.float()
            out.append((c @ wo.T)[0])
        return torch.stack(out)

    # ---- text -----------------------------------------------------------------------------------
    def logits(self, tokens: list[int], a: torch.Tensor | None) -> torch.Tensor:
        """Logits of every position of ``tokens`` (no cache), with music ``a`` or none; ``(seq, vocab)``."""
        adapters = None if a is None else self.adapter_tokens(a)
        return self.llama(torch.tensor([tokens]), adapters=adapters)[0]

    @torch.inference_mode()
    def generate(
        self,
        audio,
        question: str | None = None,
        *,
        sample_rate: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        seed: int | None = None,
        max_window_seconds: float = MAX_WINDOW_SECONDS,
    ) -> Generation:
        """Answer ``question`` about ``audio`` (path, bytes or array + ``sample_rate``), KV-cached.

        Greedy when ``temperature`` is 0. Stops at EOS or after ``max_new_tokens``.
        """
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer attached; build the model with training.reference.build.load_reference")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        sampler = Sampler(temperature, top_p, seed)
        wave = load_audio(audio, sample_rate)
        a = self.music_query(self.state_means(wave, max_window_seconds=max_window_seconds)[0])
        prompt = self.tokenizer.encode_prompt(question)
        return self.generate_from_query(a, prompt, sampler, max_new_tokens)

    @torch.inference_mode()
    def generate_from_query(
        self, a: torch.Tensor, prompt: list[int], sampler: Sampler, max_new_tokens: int
    ) -> Generation:
        """Decode from a music query ``a`` and prompt ids; the text half of :meth:`generate`."""
        assert self.tokenizer is not None
        cache = self.llama.new_cache(1, len(prompt) + max_new_tokens)
        adapters = self.adapter_tokens(a)
        logits = self.llama(torch.tensor([prompt]), 0, cache=cache, adapters=adapters, last_only=True)
        out: list[int] = []
        eos = False
        for step in range(max_new_tokens):
            token = sampler.pick(logits[0].numpy())
            if token == self.tokenizer.eos_id:
                eos = True
                break
            out.append(token)
            if step + 1 < max_new_tokens:
                pos = len(prompt) + step
                logits = self.llama(torch.tensor([[token]]), pos, cache=cache, adapters=adapters, last_only=True)
        return Generation(out, self.tokenizer.decode(out), list(prompt), eos)
