"""``bert-gluon`` command line: a thin layer over the library's functions.

Each sub-command parses its arguments and calls one library function; all the work
(and its docstrings) lives in the modules.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


# --- demo -------------------------------------------------------------------------------
def _add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="build the tutorial's blocks and print their output shapes")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import shapes_demo

    shapes_demo()
    return 0


# --- pretrained weights (owner: checkpoints) --------------------------------------------
def _add_weights_commands(sub) -> None:
    pass


# --- fine-tuning: finetune, evaluate, predict (owner: finetuning) -----------------------
def _add_finetuning_commands(sub) -> None:
    pass


# --- pre-training: create-pretraining-data, pretrain (owner: pretraining) --------------
def _add_pretraining_commands(sub) -> None:
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bert-gluon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_command(sub)
    _add_weights_commands(sub)
    _add_finetuning_commands(sub)
    _add_pretraining_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
