"""Export a trained vision run in timm's Hugging Face layout (config.json + model.safetensors).

    python scripts/export_model.py RUN_DIR_OR_CHECKPOINT OUT_DIR [--ema]

RUN_DIR_OR_CHECKPOINT is a vision run directory (its newest readable checkpoint is used) or
a checkpoint file; ``--ema`` exports the EMA weights instead of the trained ones. The folder
loads with ``timm.create_model("local-dir:OUT_DIR", pretrained=True)`` after
``import multimax.integrations.timm`` (docs/sharing_models.md). The work is done by
``multimax/integrations/timm_checkpoints.py``.
"""

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a vision run directory or a checkpoint file")
    parser.add_argument("out_dir", type=Path, help="a new folder for config.json + weights")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    args = parser.parse_args(argv)

    from experiments.core.rundir import load_checkpoint
    from multimax.integrations.timm import create_model_from_checkpoint
    from multimax.integrations.timm_checkpoints import export_for_hf, load_checkpoint_file

    if args.source.is_dir():
        state = load_checkpoint(args.source)
        if state is None:
            sys.exit(
                f"ERROR: no readable checkpoint in {args.source}: is it a vision run directory?"
            )
    elif args.source.is_file():
        state = load_checkpoint_file(args.source)
    else:
        sys.exit(f"ERROR: {args.source} does not exist: give a vision run directory or checkpoint")
    try:
        model = create_model_from_checkpoint(state, use_ema=args.ema)
        out = export_for_hf(model, args.out_dir)
    except (ValueError, FileExistsError) as err:
        sys.exit(f"ERROR: {err}")
    weights = "EMA" if args.ema else "trained"
    print(f"exported {model.pretrained_cfg['architecture']} ({weights} weights) to {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
    main()
