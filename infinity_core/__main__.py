"""`python -m infinity_core <command> ...`

Subcommands live in their own modules, imported only when used. To add one, put a module in this
package that defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int` (exit code),
and add `name: (module, one-line help)` to COMMANDS.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("infinity_core.convert", "convert a transformer or VAE checkpoint into one .safetensors file"),
    "train": ("infinity_core.train", "train an Infinity transformer with bitwise self-correction (torchrun for DDP)"),
    "train-vae": ("infinity_core.train_vae", "train a BSQ VAE tokenizer (reconstruction + commitment + entropy)"),
    "eval-shapes": ("infinity_core.shapes_eval", "held-out prompt-following evaluation of a shapes model"),
    "generate": ("infinity_core.generate_cli", "text-to-image: render PNGs, settings stored in the PNG metadata"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infinity_core",
                                     description="Infinity (bitwise VAR text-to-image) tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the chosen command (keeps --help fast)
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
