"""The ``armature`` command: ``armature train [hydra overrides]``."""

from __future__ import annotations

import argparse
import sys

JOBS = {"ddpo": "armature.jobs.ddpo"}

EPILOG = """examples:
  armature train                                  # the embedded default: DDPO on the tiny model
  armature train algo.num_epochs=50 trainer.num_workers=2
  armature train model=sd15 cluster=remote tracking=server
  armature train --cfg                            # print the composed config and exit
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="armature", description="Armature: RLHF for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="online RL fine-tuning (configs/train.yaml)", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. algo.num_epochs=20")
    train.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    args = parser.parse_args(argv)

    from armature.platform.config import ConfigError, compose

    try:
        cfg = compose("train", args.overrides)
    except ConfigError as err:
        print(f"armature: {err}", file=sys.stderr)
        return 2
    if args.cfg:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    import importlib

    job = importlib.import_module(JOBS[cfg.algo.name])
    metrics = job.run(cfg)
    if metrics:
        print(f"[armature] done: epoch {int(metrics.get('epoch', -1)) + 1}, "
              f"reward {metrics.get('reward_mean', float('nan')):+.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
