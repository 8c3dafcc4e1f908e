"""The options of `ar3d pretrain --objective hlip` (kept apart: the pretrain command is shared)."""

from __future__ import annotations

import argparse

from model_core.cli._common import overrides
from model_core.errors import Ar3dInputError
from model_core.vocabulary import HLIP_SCANS


def add_hlip_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hlip (fixed by the checkpoint on --resume)")
    g.add_argument("--text-model", metavar="DIR",
                   help="a local pretrained BERT-style model (config.json, weights, tokenizer.json or vocab.txt) that "
                        "the text tower starts from; default: a small BERT, random init, and a WordPiece tokenizer "
                        "trained on the reports")
    g.add_argument("--text-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field of the text tower's transformers config, e.g. --text-set "
                        "num_hidden_layers=2 (repeatable)")
    g.add_argument("--scopes", default="two-level", metavar="LAYOUT",
                   help="attention scope of each block: two-level (scan, scan, study; default), three-level "
                        "(slice, scan, study), or a comma-separated pattern repeated over the blocks")
    g.add_argument("--contrastive-loss", choices=("clip", "siglip"), default="clip",
                   help="OpenCLIP's ClipLoss (symmetric InfoNCE, default) or SigLipLoss")
    g.add_argument("--scans", type=int, metavar="N", help=f"scans per training sample (default {HLIP_SCANS})")
    g.add_argument("--embed-dim", type=int, default=512, help="width of the shared embedding (default 512)")
    g.add_argument("--vocab-size", type=int, default=2000, help="WordPiece vocabulary trained on the reports (default 2000)")
    g.add_argument("--max-length", type=int, default=128, help="tokens per report (default 128)")


def hlip_options(args: argparse.Namespace) -> dict:
    """`HLIPObjective` options (and what `prepare_hlip` turns into its text tower) from the command line."""
    for name in ("scans", "embed_dim", "vocab_size", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise Ar3dInputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    options = {"scopes": args.scopes, "loss": args.contrastive_loss, "embed_dim": args.embed_dim,
               "max_length": args.max_length, "vocab_size": args.vocab_size, "text_overrides": overrides(args.text_set)}
    if args.text_model:
        options["text_model"] = str(args.text_model)
    return options
