"""``mullama-export``: checkpoint -> bundle, and verification of a bundle against its source.

    mullama-export [-q] bundle --checkpoint CKPT --llama-dir DIR --mert-dir DIR --out BUNDLE
                          [--quant q4_k_m ...] [--encoder-precision int8 ...] [--audio FILE ...]
    mullama-export verify BUNDLE --checkpoint CKPT --llama-dir DIR --mert-dir DIR [--audio FILE ...]
    mullama-export requantize BUNDLE [--force]   (int8 graphs from the bundle's fp32 graphs, in place)
    mullama-export trt BUNDLE [--fp16] [--min-seconds S --opt-seconds 10 --max-seconds 30] [--workspace-gb N]
    mullama-export gguf ...      (LLaMA + deltas -> GGUF only; see --help)
    mullama-export quantize ...  (GGUF -> q8_0 / q4_k_m; see --help)

``-q`` / ``--quiet`` (before or after the command): no progress lines. Each command has ``--help``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from mullama_sdk.commandline import EXIT_ERROR, dispatch
from mullama_sdk.manifest import ENCODER_PRECISIONS, LLM_QUANTS

PROG = "mullama-export"
#: Sub-command -> ``"module:function"`` (:func:`mullama_sdk.commandline.dispatch`).
COMMANDS = {name: f"export.cli:{name}" for name in ("bundle", "verify", "requantize", "trt", "gguf", "quantize")}
_QUIET = ("-q", "--quiet")


def main(argv: list[str] | None = None) -> int:
    """The console script: SIGTERM / SIGHUP unwind like Ctrl-C for every command (partial files are removed,
    a child process is stopped), then :func:`mullama_sdk.commandline.dispatch`."""
    from export.interrupts import termination_handlers

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in _QUIET:  # the program's option, before the command: pass it to the command
        argv = argv[1:2] + ([argv[0]] if argv[1:2] and argv[1] not in ("gguf", "quantize") else []) + argv[2:]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llama_cpp.native").setLevel(logging.ERROR)
    # torch.onnx's exporter warns once per torchvision op it cannot register; we export no vision ops.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with termination_handlers(include_sigint=True):
        try:
            return dispatch(PROG, __doc__, COMMANDS, argv)
        except KeyboardInterrupt as e:  # between commands' own handling (an import, argument parsing)
            return _interrupted(e)


def _interrupted(e: KeyboardInterrupt) -> int:
    """``mullama-export: interrupted (SIGTERM); ...`` and the exit status of the signal (130 for Ctrl-C)."""
    import signal

    from export.interrupts import exit_code_for

    _stderr(f"{PROG}: interrupted ({signal.Signals(exit_code_for(e) - 128).name}); partial files were removed")
    return exit_code_for(e)


def _stderr(msg: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # a closed terminal (SIGHUP) cannot take it
        print(msg, file=sys.stderr, flush=True)


def _command(run: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """A sub-command that reports an interruption by its signal, with the signal's exit status."""

    @functools.wraps(run)
    def command(argv: list[str]) -> int:
        try:
            return run(argv)
        except KeyboardInterrupt as e:
            return _interrupted(e)

    return command


def _parser(command: str, help_text: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} {command}", description=help_text)
    p.add_argument(*_QUIET, action="store_true", dest="quiet", help="no progress lines")
    return p


def _sources(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, type=Path, help="MU-LLaMA checkpoint.pth or a mullama checkpoint")
    p.add_argument("--llama-dir", required=True, type=Path,
                   help="Meta LLaMA model folder (params.json, consolidated.*.pth; tokenizer.model there or "
                        "one level up), or the folder holding it")
    p.add_argument("--mert-dir", required=True, type=Path, help="MERT folder (config.json, ...)")
    p.add_argument("--audio", nargs="*", type=Path, default=[], help="extra clips for the verification")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary unpickling (trusted files only)")


def _reporter(args):
    from export.progress import Reporter

    return Reporter.terminal(args.quiet)


@_command
def bundle(argv: list[str]) -> int:
    """``mullama-export bundle``: :func:`export.build.build_bundle`."""
    b = _parser("bundle", "export a checkpoint into a verified bundle folder")
    _sources(b)
    b.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    b.add_argument("--quant", nargs="+", choices=LLM_QUANTS, default=["q4_k_m"],
                   help="GGUF types to ship; the first is the runtime default (default: q4_k_m)")
    b.add_argument("--encoder-precision", nargs="+", choices=ENCODER_PRECISIONS, default=["fp32", "int8"],
                   help="ONNX variants to ship (default: fp32 int8; the runtime defaults to int8 on CPU)")
    b.add_argument("--verify-llm", choices=("auto", "yes", "no"), default="auto",
                   help="check the GGUFs against torch during the export (auto: for models < 1.5B params)")
    b.add_argument("--no-strict", action="store_true", help="write the bundle even if a verification row fails")
    b.add_argument("--overwrite", action="store_true",
                   help="replace a previous bundle at --out (refused for a folder holding anything else)")
    b.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="export the torch music model in a child process, so none of its memory is held "
                        "afterwards (auto: for music models > 200M params)")
    b.add_argument("--trt", action="store_true", help="also build TensorRT engines (needs an NVIDIA GPU)")
    args = b.parse_args(argv)
    say = _reporter(args)
    from export.build import BundleOptions, build_bundle

    if args.trt:
        from mullama_sdk.errors import BackendUnavailableError

        raise BackendUnavailableError("--trt: TensorRT engines are built by `mullama-export trt BUNDLE` "
                                      "on a machine with an NVIDIA GPU and tensorrt installed")
    options = BundleOptions(
        quants=tuple(dict.fromkeys(args.quant)), encoder_precisions=tuple(dict.fromkeys(args.encoder_precision)),
        verify_llm={"auto": None, "yes": True, "no": False}[args.verify_llm],
        overwrite=args.overwrite, strict=not args.no_strict,
        isolate_music_export={"auto": None, "yes": True, "no": False}[args.isolate],
    )
    build_bundle(args.checkpoint, args.llama_dir, args.mert_dir, args.out, options=options, audio=args.audio,
                 trust_pickle=args.trust_checkpoint, threads=args.threads, progress=say)
    return 0


@_command
def requantize(argv: list[str]) -> int:
    """``mullama-export requantize``: :func:`export.requantize.requantize_bundle`."""
    r = _parser("requantize", "re-quantize a bundle's int8 graphs from its fp32 graphs (the scheme that is right "
                "on every CPU), in place; no checkpoint needed")
    r.add_argument("bundle", type=Path)
    r.add_argument("--force", action="store_true", help="re-quantize even if the bundle has the current scheme")
    r.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the comparison")
    r.add_argument("--no-strict", action="store_true", help="replace the graphs even if their comparison fails")
    args = r.parse_args(argv)
    say = _reporter(args)
    from export.requantize import requantize_bundle
    from export.verify import format_table

    result = requantize_bundle(args.bundle, force=args.force, strict=not args.no_strict, threads=args.threads,
                               progress=say)
    if result.changed:
        say("\n" + format_table(result.checks))
    return 0


@_command
def trt(argv: list[str]) -> int:
    """``mullama-export trt``: :func:`export.trt.build_bundle_engines`."""
    t = _parser("trt", "add TensorRT engines (encoder + adapter) for this machine's NVIDIA GPU to a bundle")
    t.add_argument("bundle", type=Path)
    t.add_argument("--fp16", action="store_true", help="fp16 engines (default: fp32)")
    t.add_argument("--min-seconds", type=float, default=None,
                   help="shortest window of the profile (default: 400 samples = 1/60 s, one MERT frame; raised to "
                        "the bundle's own minimum, 0.5 s in older bundles)")
    t.add_argument("--opt-seconds", type=float, default=10.0, help="window length TensorRT tunes for (default 10)")
    t.add_argument("--max-seconds", type=float, default=30.0, help="longest window of the profile (default 30)")
    t.add_argument("--workspace-gb", type=float, default=None,
                   help="builder workspace limit in GiB (default: TensorRT's, the GPU's memory)")
    t.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the verification")
    t.add_argument("--no-strict", action="store_true", help="add the engines even if the verification fails")
    args = t.parse_args(argv)
    say = _reporter(args)
    from export.trt import DEFAULT_MIN_SECONDS, TrtBuildOptions, build_bundle_engines, waveform_profile

    options = TrtBuildOptions(precision="fp16" if args.fp16 else "fp32",
                              profile=waveform_profile(DEFAULT_MIN_SECONDS if args.min_seconds is None
                                                       else args.min_seconds, args.opt_seconds, args.max_seconds),
                              workspace_gb=args.workspace_gb, strict=not args.no_strict)
    build_bundle_engines(args.bundle, options, threads=args.threads, progress=say)
    return 0


@_command
def gguf(argv: list[str]) -> int:
    """``mullama-export gguf``: LLaMA + merged deltas -> GGUF only (:func:`export.gguf_export.main`)."""
    from export.gguf_export import main as gguf_main

    return gguf_main(argv)


@_command
def quantize(argv: list[str]) -> int:
    """``mullama-export quantize``: a GGUF with llama.cpp's quantizer (:func:`export.quantize.main`)."""
    from export.quantize import main as quantize_main

    return quantize_main(argv)


@_command
def verify(argv: list[str]) -> int:
    """``mullama-export verify``: re-run every comparison of a bundle against its source; exit 2 on failure."""
    v = _parser("verify", "re-run every comparison of a bundle against its source; exit 2 on failure")
    v.add_argument("bundle", type=Path)
    _sources(v)
    v.add_argument("--skip-llm", action="store_true", help="only the ONNX graphs (no full torch model needed)")
    v.add_argument("--fast", action="store_true", help="skip hashing the files (their sizes are still checked)")
    v.add_argument("--checksums", action="store_true", help=argparse.SUPPRESS)  # the default since --fast
    args = v.parse_args(argv)
    say = _reporter(args)
    from export.build import check_inputs
    from mullama_sdk.bundle_files import check_files
    from mullama_sdk.manifest import load_manifest

    # Cheap checks first (the bundle, its files, the input paths), then the heavy imports.
    manifest = load_manifest(args.bundle)
    check_inputs(args.checkpoint, args.llama_dir, args.mert_dir, args.audio)
    n_files = len(manifest.files)
    if args.fast:
        check_files(args.bundle, manifest, list(manifest.files), sha256=False)
        files_note = f"{n_files} files present with the listed sizes (not hashed: --fast)"
    else:
        with say.step(f"checksums: sha256 of {n_files} files"):
            check_files(args.bundle, manifest, list(manifest.files), sha256=True)
        files_note = f"{n_files} files match their sha256"

    from export.verify import (
        check_windows,
        failed_rows,
        format_table,
        llm_checks,
        onnx_checks,
        onnx_reference,
        trt_checks,
    )
    from training.reference.build import build_model, build_music_model
    from training.reference.model_sources import open_sources

    with say.step("torch reference: " + ("music model" if args.skip_llm else "full model")):
        src = open_sources(args.checkpoint, args.llama_dir, args.mert_dir, trust_pickle=args.trust_checkpoint)
        model = build_music_model(src) if args.skip_llm else build_model(src)
    windows = check_windows(args.audio, min_samples=manifest.min_window_samples)
    say(f"verifying {args.bundle} against {args.checkpoint} on {len(windows)} windows")
    with say.step("verify: ONNX graphs vs torch"):
        checks = onnx_checks(onnx_reference(model, windows), args.bundle, manifest, threads=args.threads)
    if not args.skip_llm:
        with say.step("verify: llama.cpp (hooked) vs torch"):
            checks += llm_checks(model, args.bundle, manifest, windows, threads=args.threads)
    if manifest.trt:
        with say.step("verify: TensorRT engines vs ONNX Runtime"):
            checks += trt_checks(args.bundle, manifest, audio_files=args.audio, threads=args.threads)
    print(format_table(checks))
    failed = failed_rows(checks)
    skipped = sum(c.skipped for c in checks)
    print(f"verify: {'FAILED' if failed else 'OK'}: {len(checks) - len(failed) - skipped} of {len(checks)} checks "
          f"passed, {len(failed)} failed, {skipped} skipped; {files_note}", flush=True)
    if failed:
        _stderr(f"{PROG}: verification FAILED: {', '.join(failed)}")
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
