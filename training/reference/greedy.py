"""``mullama-train reference``: greedy MU-LLaMA output from the torch reference, as JSON.

This is the yardstick every later stage (ONNX, llama.cpp, the SDK) is compared with. Also runs as
``python -m training.reference.greedy`` (same arguments, same error convention).

    mullama-train reference --checkpoint CKPT --llama-dir DIR --mert-dir DIR --audio FILE \\
        [--question Q] [--max-new-tokens N] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from mullama_sdk.commandline import run_command
from mullama_sdk.constants import DEFAULT_MAX_NEW_TOKENS
from mullama_sdk.errors import ConfigError, MullamaError
from mullama_sdk.prompt import DEFAULT_QUESTION

PROG = "mullama-train reference"
_DTYPES = ("float32", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="MU-LLaMA checkpoint.pth or our checkpoint")
    p.add_argument("--llama-dir", required=True, type=Path,
                   help="Meta LLaMA model folder (params.json, consolidated.*.pth; tokenizer.model there or "
                        "one level up), or the folder holding it")
    p.add_argument("--mert-dir", required=True, type=Path, help="MERT folder (config.json, ...)")
    p.add_argument("--audio", required=True, nargs="+", type=Path, help="audio file(s) to caption")
    p.add_argument("--question", default=DEFAULT_QUESTION, help=f"instruction (default: {DEFAULT_QUESTION!r})")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default here)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="precision of the LLaMA part")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary unpickling of the checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object per audio file")
    return p


def main(argv: list[str] | None = None) -> int:
    """``mullama-train reference``: errors raised here are reported by :mod:`mullama_sdk.commandline`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from training.reference.build import load_reference

    try:
        t0 = time.perf_counter()
        model = load_reference(
            args.checkpoint, args.llama_dir, args.mert_dir,
            dtype=getattr(torch, args.dtype), trust_pickle=args.trust_checkpoint,
        )
        load_s = time.perf_counter() - t0
        for audio in args.audio:
            t0 = time.perf_counter()
            gen = model.generate(
                audio, args.question, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            )
            elapsed = time.perf_counter() - t0
            if args.json:
                print(json.dumps({
                    "file": str(audio), "text": gen.text, "tokens": gen.tokens,
                    "prompt_tokens": gen.prompt_tokens, "stopped_at_eos": gen.stopped_at_eos,
                    "timings": {"load_s": round(load_s, 3), "generate_s": round(elapsed, 3)},
                }, ensure_ascii=False))
            else:
                print(f"{audio}: {gen.text}")
    except MullamaError:
        raise
    except ValueError as e:  # bad generation settings (e.g. --max-new-tokens -1): a usage error, not a bug
        raise ConfigError(str(e)) from e
    return 0


if __name__ == "__main__":
    sys.exit(run_command(PROG, main, sys.argv[1:]))
