"""`ar3d info`: list the shipped models, or print a checkpoint's model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from model_core.cli._common import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="NAME_OR_DIR", help="a shipped model's name or a checkpoint folder")


def run(args: argparse.Namespace) -> int:
    from model_core.checkpoint.card import card_rows, summary
    from model_core.checkpoint.store import SHIPPED_DIR, list_shipped, read_config, resolve_model
    from model_core.vocabulary import DEFAULT_ENCODER, ENCODER_ENV

    if args.model is None:
        names = list_shipped()
        if not names:
            print(f"no models are shipped with this version; pass a checkpoint folder, or set {ENCODER_ENV}=DIR "
                  f"to use one as {DEFAULT_ENCODER!r}")
        for name in names:
            print(f"{name}: {summary(read_config(resolve_model(name)))}")
        return 0
    path = resolve_model(args.model)
    for key, value in card_rows(path, read_config(path)):
        print(f"{key}: {value}")
    if path.parent == SHIPPED_DIR:
        card = Path(__file__).resolve().parents[2] / "docs" / "models" / f"{path.name}.md"
        print(f"model card: {card if card.is_file() else f'docs/models/{path.name}.md in the napari-ar3d repository'}")
    return 0


COMMAND = Command("info", "list shipped models, or print a checkpoint's model card", add_arguments, run)
