"""How to generate: one frozen :class:`GenerationOptions`, resolved once against the bundle's defaults.

The public methods (``caption``, ``ask``, ``caption_stream``, ``caption_batch``) keep their keyword
arguments; each builds one options object from them, validates it there (a bad value fails before
any audio is encoded) and passes that single object down, instead of four loose values through
every private layer. Fields left ``None`` mean "the bundle's setting" (manifest ``sampling``), and
the bundle's settings fall back to :mod:`mullama_sdk.constants`, the one place the original
script's defaults are written down. Change a field with :func:`dataclasses.replace`, as with
whisper's ``DecodingOptions``.

The question and the ``stop`` callback are not options: a batch has one question per clip, and a
callback is part of one call, not of a reusable setting.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping

from mullama_sdk.constants import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from mullama_sdk.errors import OptionError
from mullama_sdk.sampling import Sampler, check_sampling

#: The setting used for a field that neither the call nor the bundle's manifest gives.
BUILTIN_DEFAULTS = {
    "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
    "temperature": DEFAULT_TEMPERATURE,
    "top_p": DEFAULT_TOP_P,
}


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """Sampling and length of one generation; ``None`` = the bundle's setting (see :meth:`resolve`).

    Attributes:
        max_new_tokens: Most tokens generated (the EOS not counted), >= 0.
        temperature: 0 = greedy (argmax); otherwise logits are divided by it before the softmax.
        top_p: Nucleus mass kept, in (0, 1].
        seed: Seed of the sampler's random stream (reproducible sampling); ``None`` = from the OS.

    Raises:
        OptionError: a value outside the ranges above (the message names the valid values).
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, numbers.Real) or n != int(n):
                raise OptionError(f"max_new_tokens must be a whole number >= 0, got {n!r}")
            if n < 0:
                raise OptionError(f"max_new_tokens must be >= 0, got {int(n)}")
            object.__setattr__(self, "max_new_tokens", int(n))
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise OptionError(f"{name} must be a number, got {value!r}")
                object.__setattr__(self, name, float(value))
        check_sampling(DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
                       DEFAULT_TOP_P if self.top_p is None else self.top_p, OptionError)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or self.seed < 0):
            raise OptionError(f"seed must be a whole number >= 0 or None, got {self.seed!r}")

    @property
    def resolved(self) -> bool:
        """Every field but ``seed`` is set (``seed=None`` is a setting: a seed from the OS)."""
        return None not in (self.max_new_tokens, self.temperature, self.top_p)

    def resolve(self, defaults: Mapping[str, float]) -> GenerationOptions:
        """These options with every ``None`` field (but ``seed``) taken from ``defaults`` (a manifest's
        ``sampling``), else from :data:`BUILTIN_DEFAULTS`. Done once per call, before decoding."""
        filled = {name: defaults.get(name, builtin) for name, builtin in BUILTIN_DEFAULTS.items()
                  if getattr(self, name) is None}
        return dataclasses.replace(self, **filled) if filled else self

    def new_sampler(self) -> Sampler:
        """A fresh :class:`~mullama_sdk.sampling.Sampler` (its own random stream) for one sequence."""
        if not self.resolved:
            raise ValueError("resolve() the options against the bundle's defaults before sampling")
        return Sampler(self.temperature, self.top_p, self.seed)
