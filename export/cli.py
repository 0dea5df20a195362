"""``mullama-export``: checkpoint -> bundle, and verification of a bundle against its source.

    mullama-export bundle --checkpoint CKPT --llama-dir DIR --mert-dir DIR --out BUNDLE
                          [--quant q4_k_m ...] [--encoder-precision int8 ...] [--audio FILE ...]
    mullama-export verify BUNDLE --checkpoint CKPT --llama-dir DIR --mert-dir DIR [--audio FILE ...]
    mullama-export trt BUNDLE [--fp16] [--min-seconds 0.5 --opt-seconds 10 --max-seconds 30] [--workspace-gb N]
    mullama-export gguf ...      (LLaMA + deltas -> GGUF only; see --help)
    mullama-export quantize ...  (GGUF -> q8_0 / q4_k_m; see --help)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mullama_sdk.bundle import ENCODER_PRECISIONS, LLM_QUANTS
from mullama_sdk.errors import MullamaError


def _sources(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, type=Path, help="MU-LLaMA checkpoint.pth or a mullama checkpoint")
    p.add_argument("--llama-dir", required=True, type=Path, help="Meta LLaMA folder (params.json, tokenizer.model)")
    p.add_argument("--mert-dir", required=True, type=Path, help="MERT folder (config.json, ...)")
    p.add_argument("--audio", nargs="*", type=Path, default=[], help="extra clips for the verification")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary unpickling (trusted files only)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mullama-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("-q", "--quiet", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="export a checkpoint into a verified bundle folder")
    _sources(b)
    b.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    b.add_argument("--quant", nargs="+", choices=LLM_QUANTS, default=["q4_k_m"],
                   help="GGUF types to ship; the first is the runtime default (default: q4_k_m)")
    b.add_argument("--encoder-precision", nargs="+", choices=ENCODER_PRECISIONS, default=["fp32", "int8"],
                   help="ONNX variants to ship (default: fp32 int8; the runtime defaults to int8 on CPU)")
    b.add_argument("--verify-llm", choices=("auto", "yes", "no"), default="auto",
                   help="check the GGUFs against torch during the export (auto: for models < 1.5B params)")
    b.add_argument("--no-strict", action="store_true", help="write the bundle even if a verification row fails")
    b.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    b.add_argument("--trt", action="store_true", help="also build TensorRT engines (needs an NVIDIA GPU)")
    v = sub.add_parser("verify", help="re-run every comparison of a bundle against its source; exit 2 on failure")
    v.add_argument("bundle", type=Path)
    _sources(v)
    v.add_argument("--skip-llm", action="store_true", help="only the ONNX graphs (no full torch model needed)")
    v.add_argument("--checksums", action="store_true", help="also hash every file against the manifest")
    t = sub.add_parser("trt", help="add TensorRT engines (encoder + adapter) for this machine's NVIDIA GPU to a bundle")
    t.add_argument("bundle", type=Path)
    t.add_argument("--fp16", action="store_true", help="fp16 engines (default: fp32)")
    t.add_argument("--min-seconds", type=float, default=0.5, help="shortest window of the profile (default 0.5)")
    t.add_argument("--opt-seconds", type=float, default=10.0, help="window length TensorRT tunes for (default 10)")
    t.add_argument("--max-seconds", type=float, default=30.0, help="longest window of the profile (default 30)")
    t.add_argument("--workspace-gb", type=float, default=None,
                   help="builder workspace limit in GiB (default: TensorRT's, the GPU's memory)")
    t.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the verification")
    t.add_argument("--no-strict", action="store_true", help="add the engines even if the verification fails")
    g = sub.add_parser("gguf", help="LLaMA + merged deltas -> GGUF only", add_help=False)
    g.add_argument("args", nargs=argparse.REMAINDER)
    q = sub.add_parser("quantize", help="quantize a GGUF with llama.cpp's quantizer", add_help=False)
    q.add_argument("args", nargs=argparse.REMAINDER)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llama_cpp.native").setLevel(logging.ERROR)
    # torch.onnx's exporter warns once per torchvision op it cannot register; we export no vision ops.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    say = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    try:
        if args.command == "gguf":
            from export.gguf_export import main as gguf_main

            return gguf_main(args.args)
        if args.command == "quantize":
            from export.quantize import main as quantize_main

            return quantize_main(args.args)
        if args.command == "bundle":
            return _bundle(args, say)
        if args.command == "trt":
            return _trt(args, say)
        return _verify(args, say)
    except MullamaError as e:
        print(f"mullama-export: error: {e}", file=sys.stderr)
        return 2


def _bundle(args, say) -> int:
    from export.bundle import BundleOptions, build_bundle

    if args.trt:
        from mullama_sdk.errors import BackendUnavailableError

        raise BackendUnavailableError("--trt: TensorRT engines are built by `mullama-export trt BUNDLE` "
                                      "on a machine with an NVIDIA GPU and tensorrt installed")
    options = BundleOptions(
        quants=tuple(dict.fromkeys(args.quant)), encoder_precisions=tuple(dict.fromkeys(args.encoder_precision)),
        verify_llm={"auto": None, "yes": True, "no": False}[args.verify_llm],
        overwrite=args.overwrite, strict=not args.no_strict,
    )
    build_bundle(args.checkpoint, args.llama_dir, args.mert_dir, args.out, options=options, audio=args.audio,
                 trust_pickle=args.trust_checkpoint, threads=args.threads, progress=say)
    return 0


def _trt(args, say) -> int:
    from export.trt import TrtBuildOptions, build_bundle_engines, waveform_profile

    options = TrtBuildOptions(precision="fp16" if args.fp16 else "fp32",
                              profile=waveform_profile(args.min_seconds, args.opt_seconds, args.max_seconds),
                              workspace_gb=args.workspace_gb, strict=not args.no_strict)
    build_bundle_engines(args.bundle, options, threads=args.threads, progress=say)
    return 0


def _verify(args, say) -> int:
    from export.verify import check_windows, format_table, llm_checks, onnx_checks, onnx_reference, trt_checks
    from mullama_sdk.bundle import check_files, load_manifest
    from training.loading import build_model, build_music_model, open_sources

    manifest = load_manifest(args.bundle)
    check_files(args.bundle, manifest, list(manifest.files), sha256=args.checksums)
    src = open_sources(args.checkpoint, args.llama_dir, args.mert_dir, trust_pickle=args.trust_checkpoint)
    model = build_music_model(src) if args.skip_llm else build_model(src)
    windows = check_windows(args.audio)
    say(f"verifying {args.bundle} against {args.checkpoint} on {len(windows)} windows")
    checks = onnx_checks(onnx_reference(model, windows), args.bundle, manifest, threads=args.threads)
    if not args.skip_llm:
        checks += llm_checks(model, args.bundle, manifest, windows, threads=args.threads)
    checks += trt_checks(args.bundle, manifest, audio_files=args.audio, threads=args.threads)
    print(format_table(checks))
    failed = [c.name for c in checks if not c.passed and not c.skipped]
    if failed:
        print(f"mullama-export: verification FAILED: {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
