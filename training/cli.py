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
Each command takes ``-h``. Errors are one line, ``mullama-train: error: ...``, exit status 2.
"""

from __future__ import annotations

import sys

from mullama_sdk.commandline import dispatch

PROG = "mullama-train"
#: Sub-command -> ``module:function`` (imported only when chosen; each parses its own arguments).
COMMANDS = {
    "reference": "training.reference.greedy:main",
    "features": "training.recipes.features:main",
    "pretrain": "training.recipes.launch:pretrain",
    "finetune": "training.recipes.launch:finetune",
    "eval": "training.evaluation.evaluate:main",
}


def main(argv: list[str] | None = None) -> int:
    """The ``mullama-train`` console script (also ``python -m training``)."""
    return dispatch(PROG, __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
