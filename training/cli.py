"""``mullama-train``: the training side's command line.

    mullama-train reference --checkpoint CKPT --llama-dir DIR --mert-dir DIR --audio FILE [...]

``reference`` runs the torch reference model (greedy by default): the yardstick the exported
bundle is compared with. Training recipes and evaluation arrive as further subcommands.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"reference": "training.reference"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmullama-train: error: unknown command {argv[0]!r}; choose from {', '.join(commands)}",
                  file=sys.stderr)
            return 2
        return 0 if argv else 2
    from importlib import import_module

    return import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
