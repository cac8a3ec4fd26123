"""``klviewer train``: the command-line shell over :func:`klviewer.priors.train.train_prior`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from klviewer.cli.options import add_device_option
from klviewer.cli.progress import StageBars
from klviewer.priors.unet import ARCH_PRESETS


def _cmd_train(args: argparse.Namespace) -> int:
    from klviewer.priors.train import TrainConfig, train_prior

    cfg = TrainConfig(
        out=Path(args.out), data=args.data, size=args.size, patch=args.patch, steps=args.steps, batch=args.batch,
        lr=args.lr, warmup=args.warmup, device=args.device, resume=args.resume, seed=args.seed,
        n_phantoms=args.n_phantoms, ema=args.ema, p_mean=args.p_mean, p_std=args.p_std, arch=dict(ARCH_PRESETS[args.arch]), name=args.name,
        checkpoint_every=args.checkpoint_every, report=not args.no_report, init_from=args.init_from,
        workers=args.workers, distill_from=args.distill_from,
        command=shlex.join(["klviewer", *sys.argv[1:]]),
    )
    with StageBars() as bars:
        out = train_prior(cfg, progress=lambda p: bars.update("train", p.step, cfg.steps, loss=p.loss))
    print(f"prior written to {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand to the klviewer parser."""
    p = subparsers.add_parser("train", help="train a diffusion prior (EDM UNet) on healthy phantoms or CT slices")
    p.add_argument("--data", default="phantoms",
                   help="'phantoms' (a seeded pool of healthy phantoms) or a folder of DICOM/.npy/.npz slices")
    p.add_argument("--out", required=True, help="output folder: the prior (config.json, model.safetensors), "
                                                "training/ (loss curve, report) and resume/")
    p.add_argument("--size", type=int, default=256, help="image size; folder slices are resampled to it (default 256)")
    p.add_argument("--patch", type=int, default=None,
                   help="training patch size (default: --size, i.e. whole images; smaller is faster per step)")
    p.add_argument("--steps", type=int, default=10_000, help="optimiser steps (default 10000)")
    p.add_argument("--batch", type=int, default=4, help="patches per step (default 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate after warm-up (default 1e-3)")
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps (default 200)")
    add_device_option(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last resume checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-phantoms", type=int, default=256, help="size of the phantom pool (default 256)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that build the phantom pool (default 1); the pool is the same for any count")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (default 0.999)")
    p.add_argument("--p-mean", type=float, default=-1.5, help="mean of ln sigma in the loss (default -1.5)")
    p.add_argument("--p-std", type=float, default=2.0, help="standard deviation of ln sigma (default 2.0)")
    p.add_argument("--arch", choices=sorted(ARCH_PRESETS), default="default", help="network size preset")
    p.add_argument("--name", help="prior name recorded in config.json (default: the --out folder name)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between resume checkpoints")
    p.add_argument("--no-report", action="store_true", help="skip TRAINING.md (samples and held-out denoising error)")
    p.add_argument("--init-from", metavar="PRIOR",
                   help="start from this prior's weights (name or folder, same architecture), e.g. to train a shipped prior further")
    p.add_argument("--distill-from", metavar="PRIOR",
                   help="distil this prior (name or folder): its denoised images are the targets, e.g. to train a "
                        "smaller, faster prior (--arch half) that samples like it")
    p.set_defaults(func=_cmd_train)
