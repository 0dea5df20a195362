"""``mullama``: caption audio files with a bundle from the command line.

    mullama caption FILE... --bundle DIR [--question Q] [--max-new-tokens N] [--temperature T]
                    [--top-p P] [--seed S] [--segments] [--json] [-v]

``mullama caption --help`` lists every option.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mullama_sdk.commandline import EXIT_ERROR, dispatch, say_error
from mullama_sdk.errors import MullamaError
from mullama_sdk.results import Caption

PROG = "mullama"
#: Sub-command -> ``"module:function"`` (:func:`mullama_sdk.commandline.dispatch`).
COMMANDS = {"caption": "mullama_sdk.cli:caption_main"}
_VERBOSE = ("-v", "-vv", "--verbose")


def main(argv: list[str] | None = None) -> int:
    """The console script (:func:`mullama_sdk.commandline.dispatch`). ``-v`` may also come before the command,
    as in ``mullama -v caption ...``: it is then handed to the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    lead = []
    while argv[:1] and argv[0] in _VERBOSE:
        lead.append(argv.pop(0))
    return dispatch(PROG, __doc__, COMMANDS, argv[:1] + lead + argv[1:])


def build_parser() -> argparse.ArgumentParser:
    """The options of ``mullama caption``."""
    c = argparse.ArgumentParser(prog=f"{PROG} caption", description="Caption (or ask about) audio files with "
                                "MU-LLaMA (mullama-sdk).")
    c.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: llama.cpp too)")
    c.add_argument("files", nargs="+", type=Path, help="audio files (wav, flac, ogg, mp3, ...)")
    c.add_argument("--bundle", required=True, type=Path, help="bundle folder from mullama-export")
    c.add_argument("--question", default=None, help="instruction (default: the bundle's, 'Describe the audio')")
    c.add_argument("--max-new-tokens", type=int, default=None)
    c.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--segments", action="store_true", help="also caption every window of long audio")
    c.add_argument("--quant", default=None, help="which GGUF of the bundle (f32, f16, q8_0, q4_k_m)")
    c.add_argument("--encoder-precision", default=None, help="fp32, fp16 or int8")
    c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    c.add_argument("--encoder-backend", default="auto", choices=("auto", "tensorrt", "onnxruntime"),
                   help="force the encoder backend (default: TensorRT engines when usable, else ONNX Runtime)")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--n-ctx", type=int, default=1024)
    c.add_argument("--exact", action="store_true", help="llama.cpp without flash attention, F32 KV (slower)")
    c.add_argument("--low-memory", action="store_true",
                   help="no second copy of weights, no activation arena: less memory, slower")
    c.add_argument("--json", action="store_true", help="print one JSON object per file")
    return c


def caption_main(argv: list[str]) -> int:
    """``mullama caption``: one caption per file. Exit status 0, 1 when some file failed (each is named in a
    ``mullama: error: FILE: ...`` line, the others are still captioned), 2 when the bundle cannot be loaded."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        logging.getLogger("llama_cpp.native").setLevel(logging.ERROR)
    from mullama_sdk.captioner import Captioner

    try:
        cap = Captioner.from_pretrained(
            args.bundle, device=args.device, n_threads=args.threads, n_ctx=args.n_ctx,
            encoder_precision=args.encoder_precision, quant=args.quant, exact=args.exact,
            encoder_backend=args.encoder_backend, low_memory=args.low_memory,
        )
    except (MullamaError, ValueError) as e:
        say_error(PROG, str(e))
        return EXIT_ERROR
    failed = 0
    with cap:
        for path in args.files:
            try:
                res = cap.caption(
                    path, question=args.question, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed, segments=args.segments,
                )
            except (MullamaError, ValueError) as e:
                say_error(PROG, f"{path}: {e}")
                failed += 1
                continue
            _print_result(path, res, json_lines=args.json, segments=args.segments)
    return 1 if failed else 0


def _print_result(path: Path, res: Caption, *, json_lines: bool, segments: bool) -> None:
    """One JSON object per line (``--json``), else the text, a timing line and one line per segment."""
    if json_lines:
        rec = {"file": str(path), "text": res.text, "tokens": list(res.tokens),
               "prompt_tokens": list(res.prompt_tokens), "stop_reason": res.stop_reason,
               "timings": res.timings.to_dict()}
        if segments:
            rec["segments"] = [{"start_s": s.start_s, "end_s": s.end_s, "text": s.text,
                                "tokens": list(s.tokens)} for s in res.segments]
        print(json.dumps(rec, ensure_ascii=False), flush=True)
        return
    t = res.timings
    print(f"{path}: {res.text}")
    print(f"  ({t.audio_s:.1f} s audio; encode {t.encode_ms:.0f} ms, prefill {t.prefill_ms:.0f} ms, "
          f"{t.n_tokens} tokens at {t.tokens_per_s:.1f} tok/s)", flush=True)
    for s in res.segments:
        print(f"  [{s.start_s:7.1f}-{s.end_s:7.1f} s] {s.text}")


if __name__ == "__main__":
    sys.exit(main())
