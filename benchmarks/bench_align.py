"""Prior alignment on an OOD phantom set: does it lower the measurement-domain KL and raise PSNR?

Setup (64x64, CPU; every number comes from this script):

- base prior: the default EDM UNet trained on healthy abdominal phantoms
  (``train_prior(data="phantoms", size=64)``, the same as ``klviewer train --data phantoms --size 64``);
- reference prior: the same network and schedule trained on thorax phantoms, the shifted
  distribution (``make_phantom("shift", anatomy="thorax")``: a chest slice through the heart
  instead of an abdomen);
- OOD set: thorax phantoms with seeds disjoint from the reference's training set. The first
  ``--n-align`` give the measurements the alignment uses; the next ``--n-eval`` are held out;
- measurements: ``--views`` parallel-beam views, noise-free (the likelihood assumes its 0.01 floor);
- alignment: ``align_prior`` for each of ``--variants`` (adapter mode : input image);
- evaluation on the held-out slices: ``compare_priors(base, prior, ..., reference=ref)`` gives the
  per-case PSNR/SSIM/KLIP/DC residual and the measurement-domain KL(ref || prior); the image-domain
  KL(ref || prior) on the clean held-out images (``shift_kl.image_kl``) is the ground truth the
  measurement-domain estimate stands in for.

    .venv/bin/python benchmarks/bench_align.py            # about 27 min of one idle CPU core

Writes benchmarks/results/align_benchmark.{md,json}, align_kl_curves.png and align_examples.png.
Trained priors and data are cached in --work, so a re-run only redoes what is missing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from klviewer.evaluation.compare import Comparison, compare_priors
from klviewer.inference.align import AlignConfig, align_prior
from klviewer.inference.settings import AnalysisSettings
from klviewer.inference.shift_kl import ShiftCurve, image_kl
from klviewer.io.safe_write import atomic_write, atomic_write_text
from klviewer.phantoms import make_phantom, member_seed
from klviewer.priors import load_prior
from klviewer.priors.train import TrainConfig, train_prior

SIZE = 64
REF_TRAIN_SEED, TEST_SEED = 111, 222  # thorax sets; healthy training uses its own seeds (train_prior's pool)
MODE_LR = {"full": 1e-4, "norm-bias": 3e-3, "lora": 1e-3}


def thorax_stack(path: Path, n: int, seed: int) -> Path:
    """n thorax phantoms as one (n, 64, 64) HU stack with a spacing sidecar."""
    if not path.exists():
        phantoms = [make_phantom("shift", SIZE, member_seed(seed, i), anatomy="thorax") for i in range(n)]
        hu = np.stack([p.hu for p in phantoms]).astype(np.float32)
        atomic_write(path, lambda f: np.save(f, hu))
        sidecar = {"pixel_spacing_mm": [phantoms[0].pixel_spacing_mm] * 2, "description": f"thorax seed {seed}"}
        atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar))
    return path


def trained(out: Path, data: str, steps: int, seed: int) -> Path:
    if not (out / "config.json").exists():
        train_prior(TrainConfig(out=out, data=data, size=SIZE, steps=steps, batch=4, seed=seed, device="cpu",
                                report=False, resume=(out / "resume").exists(), command="benchmarks/bench_align.py"))
    return out


@dataclass
class Row:
    label: str
    mode: str
    trainable: int | None
    align_seconds: float | None
    comparison: Comparison
    image_kl: ShiftCurve

    def summary(self) -> dict:
        after = self.comparison.means()["after"]
        before_cases = self.comparison.cases
        deltas = [c.metrics["after"]["psnr"] - c.metrics["before"]["psnr"] for c in before_cases]
        return {
            "prior": self.label, "mode": self.mode, "trainable_parameters": self.trainable,
            "align_seconds": None if self.align_seconds is None else round(self.align_seconds, 1),
            "mean_psnr": after["psnr"], "mean_ssim": after["ssim"], "mean_score": after["score"],
            "mean_total_kl": after["total_kl"], "mean_dc_residual": after["dc_residual"],
            "mean_delta_psnr_vs_base": float(np.mean(deltas)),
            "cases_better_than_base": int(sum(d > 0 for d in deltas)), "cases": len(deltas),
            "measurement_kl": self.comparison.shift_after.total, "image_kl": self.image_kl.total,
        }


def markdown(rows: list[Row], base: Row, args: argparse.Namespace, seconds: float, train_seconds: list[float]) -> str:
    b = base.comparison
    aligning = sum(r.align_seconds or 0.0 for r in rows)
    lines = [
        "# Prior alignment on an OOD phantom set (thorax measurements, abdomen prior)",
        "",
        f"Made by `{' '.join(['benchmarks/bench_align.py', *sys.argv[1:]])}` "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)). "
        f"Training the two priors took {train_seconds[0] / 60:.1f} and {train_seconds[1] / 60:.1f} min, the "
        f"alignments {aligning / 60:.1f} min (as recorded in their config.json); this invocation took "
        f"{seconds / 60:.1f} min (the evaluations, plus any alignment not already in `--work`, which is reused).",
        "",
        f"- base prior: EDM UNet (default architecture) trained {args.train_steps} steps on healthy abdominal phantoms, {SIZE}²;",
        f"- reference prior: the same, trained on 256 thorax phantoms (seeds from {REF_TRAIN_SEED});",
        f"- alignment data: measurements of {args.n_align} thorax phantoms (seeds from {TEST_SEED}), {args.views} views, "
        f"noise-free; {args.align_steps} steps, batch 1, EMA 0.99, Adam lr "
        f"{', '.join(f'{lr:g} ({mode})' for mode, lr in MODE_LR.items())}; input image `recon` = "
        f"one posterior sample per measurement under the base prior ({args.recon_steps} sampler steps) with the EDM "
        "loss on all pixels, `pinv` = the minimum-norm least-squares image with the loss on the measured line "
        "integrals only (docs/alignment.md);",
        f"- evaluation: {args.n_eval} held-out thorax phantoms (the next seeds), same acquisition, dc guidance, "
        f"{b.settings.steps} steps, posterior mean of {b.settings.samples} samples;",
        "- measurement-domain KL: KL(reference ‖ prior) from the held-out measurements (`shift_kl.measurement_kl`, "
        "derived weighting); image-domain KL: the same from the clean held-out images (`shift_kl.image_kl`), "
        "the quantity the measurement-domain estimate stands in for.",
        "",
        "| prior | trains | align time (s) | mean PSNR (dB) | Δ PSNR vs base (dB) | cases better | mean SSIM | "
        "mean KLIP score | mean DC residual | measurement-domain KL (nats) | image-domain KL (nats) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row.summary()
        trains = "—" if s["trainable_parameters"] is None else f"{s['mode']}: {s['trainable_parameters']:,} params"
        align = "—" if s["align_seconds"] is None else f"{s['align_seconds']:.0f}"
        is_base = row is base
        delta = "—" if is_base else f"{s['mean_delta_psnr_vs_base']:+.2f}"
        better = "—" if is_base else f"{s['cases_better_than_base']}/{s['cases']}"
        lines.append(f"| {s['prior']} | {trains} | {align} | {s['mean_psnr']:.2f} | {delta} | "
                     f"{better} | {s['mean_ssim']:.3f} | {s['mean_score']:.1f} | "
                     f"{s['mean_dc_residual']:.3f} | {s['measurement_kl']:.4g} | {s['image_kl']:.4g} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, row in enumerate(rows):
        for ax, curve in zip(axes, (row.comparison.shift_after, row.image_kl)):
            ax.plot(curve.sigmas, curve.cumulative, color=f"C{k}", label=f"{row.label}: {curve.total:.3g}")
    for ax, title in zip(axes, ("measurement-domain KL(ref ‖ prior)", "image-domain KL(ref ‖ prior), clean images")):
        ax.set_xscale("log")
        ax.set_xlabel("σ")
        ax.set_ylabel("cumulative KL (nats)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def examples(rows: list[Row], path: Path, n: int = 2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n, len(rows) + 1, figsize=(2.4 * (len(rows) + 1), 2.5 * n), squeeze=False)
    for i in range(n):
        truth = rows[0].comparison.cases[i].before.original_hu
        axes[i, 0].imshow(truth, cmap="gray", vmin=-1000, vmax=400)
        axes[i, 0].set_title("truth", fontsize=8)
        for j, row in enumerate(rows, start=1):
            case = row.comparison.cases[i]
            axes[i, j].imshow(case.after.recon_hu, cmap="gray", vmin=-1000, vmax=400)
            axes[i, j].set_title(f"{row.label}\n{case.metrics['after']['psnr']:.2f} dB", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/klviewer-bench-align"), help="cache of priors and data")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=4000)
    parser.add_argument("--align-steps", type=int, default=1000)
    parser.add_argument("--recon-steps", type=int, default=100)
    parser.add_argument("--n-align", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--views", type=int, default=12)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--variants", default="full:recon,norm-bias:recon,lora:recon,full:pinv",
                        help="comma-separated MODE:INPUT_IMAGE alignments to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    base = trained(work / "base-abdomen-64", "phantoms", args.train_steps, seed=1)
    ref_data = work / "thorax-train"
    ref_data.mkdir(exist_ok=True)
    thorax_stack(ref_data / "thorax_train.npy", 256, REF_TRAIN_SEED)
    reference = trained(work / "ref-thorax-64", str(ref_data), args.train_steps, seed=2)
    test_dir = work / "thorax-test"
    test_dir.mkdir(exist_ok=True)
    test = thorax_stack(test_dir / "thorax_test.npy", args.n_align + args.n_eval, TEST_SEED)
    eval_slices = f"{args.n_align}-{args.n_align + args.n_eval - 1}"
    clean = torch.from_numpy(np.load(test)[args.n_align:] / 1000.0).float()[:, None]

    settings = AnalysisSettings(views=args.views, steps=100, samples=args.samples, device="cpu", guidance="dc")
    ref_prior = load_prior(reference)

    def evaluate(label: str, prior: Path, mode: str, trainable: int | None, seconds: float | None) -> Row:
        print(f"evaluating {label}", flush=True)
        comparison = compare_priors(base, prior, [test], settings, reference=reference, slices=eval_slices)
        return Row(label, mode, trainable, seconds, comparison, image_kl(ref_prior, load_prior(prior), clean))

    started = time.perf_counter()
    rows = [evaluate("base (abdomen)", base, "-", None, None)]
    for variant in args.variants.split(","):
        mode, input_image = variant.split(":")
        out = work / f"aligned-{mode}-{input_image}-{args.views}v-{args.n_align}m-{args.align_steps}s"
        if not (out / "config.json").exists():
            print(f"aligning ({variant})", flush=True)
            align_prior(AlignConfig(prior=base, inputs=[test], out=out, mode=mode, steps=args.align_steps,
                                    lr=MODE_LR[mode], slices=f"0-{args.n_align - 1}", views=args.views,
                                    input_image=input_image, recon_steps=args.recon_steps, device="cpu",
                                    resume=(out / "resume").exists(), command="benchmarks/bench_align.py"))
        training = json.loads((out / "config.json").read_text())["training"]
        rows.append(evaluate(f"aligned ({mode}, {input_image})", out, mode, training["trainable_parameters"],
                             training["seconds"] + training["input_seconds"]))
    rows.append(evaluate("reference (thorax)", reference, "-", None, None))

    args.out.mkdir(parents=True, exist_ok=True)
    elapsed = time.perf_counter() - started
    train_seconds = [float(json.loads((p / "config.json").read_text())["training"]["seconds"]) for p in (base, reference)]
    text = markdown(rows, rows[0], args, elapsed, train_seconds)
    atomic_write_text(args.out / "align_benchmark.md", text, overwrite=True)
    doc = {"command": " ".join(["benchmarks/bench_align.py", *sys.argv[1:]]), "invocation_seconds": round(elapsed, 1),
           "training_seconds": train_seconds,
           "settings": settings.to_dict(), "views": args.views, "n_align": args.n_align, "n_eval": args.n_eval,
           "align_steps": args.align_steps, "rows": [r.summary() for r in rows],
           "per_case": {r.label: [{"slice_index": c.index, **c.metrics["after"]} for c in r.comparison.cases] for r in rows},
           "curves": {r.label: {"measurement": r.comparison.shift_after.to_dict(), "image": r.image_kl.to_dict()}
                      for r in rows}}
    atomic_write_text(args.out / "align_benchmark.json", json.dumps(doc, indent=2) + "\n", overwrite=True)
    plot(rows, args.out / "align_kl_curves.png")
    examples(rows, args.out / "align_examples.png")
    print(text)


if __name__ == "__main__":
    main()
