"""``mullama-train``: the training side's command line.

    mullama-train reference --checkpoint CKPT --llama-dir DIR --mert-dir DIR --audio FILE [...]
    mullama-train features --data train.json --mert-dir DIR --out CACHE [--audio-dir DIR]
    mullama-train pretrain --config training/configs/pretrain.yaml [key=value ...]
    mullama-train finetune --config training/configs/finetune.yaml [key=value ...]
    mullama-train eval --data eval.json (--checkpoint CKPT --llama-dir DIR --mert-dir DIR | --bundle DIR) [...]

``reference`` runs the torch reference model (greedy by default): the yardstick the exported
bundle is compared with. ``features`` caches MERT state means per clip (resumable); ``pretrain`` and
``finetune`` run MU-LLaMA's two training stages (on several GPUs under ``torchrun -m training``);
``eval`` generates answers and scores them (compat and standard metrics, random-audio control).
Each command takes ``-h``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"reference": "training.reference.greedy", "features": "training.recipes.features",
                "pretrain": "training.recipes.launch:pretrain_main", "finetune": "training.recipes.launch:finetune_main",
                "eval": "training.evaluation.evaluate"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmullama-train: error: unknown command {argv[0]!r}; choose from {', '.join(commands)}",
                  file=sys.stderr)
            return 2
        return 0 if argv else 2
    from importlib import import_module

    module, _, func = commands[argv[0]].partition(":")
    return getattr(import_module(module), func or "main")(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
