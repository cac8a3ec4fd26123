"""Time klviewer's parallel-beam operator against scikit-image on CPU.

    .venv/bin/python benchmarks/bench_radon.py [--repeats 7] [--threads 2]

Writes benchmarks/results/radon.md and prints it. Times are the median of ``--repeats`` calls
after one warm-up call, in ms, for one 1-channel image (Unix only: it reads the load average). scikit-image has no adjoint, so its
A^T column is the unfiltered back-projection ``iradon(filter_name=None)``, the usual stand-in.
Our A and A^T are timed as the operator runs them (sparse matrices on the CPU where they fit their
budget, `klviewer.physics.radon_matrix`) and with `grid_sample` alone; the matrices' one-off build
is timed apart.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, resize

from klviewer.physics import radon_matrix
from klviewer.physics.radon import ParallelBeamCT, sparse_view_angles

SIZES = (256, 512)
VIEWS = (24, 60, 180)
RESULTS = Path(__file__).parent / "results" / "radon.md"


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per call of each function, calling them in turn so that load from other
    processes on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: caches, thread pools
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class GridSampleOnly(ParallelBeamCT):
    """The operator without its sparse matrices: A and A^T by `grid_sample` and its input gradient."""

    def _matrices(self, t: torch.Tensor) -> None:
        return None


def run(repeats: int, threads: int) -> str:
    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    rows = []
    for n in SIZES:
        image = resize(shepp_logan_phantom(), (n, n), anti_aliasing=True).astype(np.float32)
        x = torch.from_numpy(image)[None, None]
        for n_views in VIEWS:
            angles = sparse_view_angles(n_views)
            degrees = np.rad2deg(angles.numpy())
            op, grid_only = ParallelBeamCT(n, angles), GridSampleOnly(n, angles)
            start = time.perf_counter()  # the first call builds and keeps the geometry's matrices
            built = radon_matrix.projection_matrices(op, torch.float32) is not None
            build_s = time.perf_counter() - start if built else None
            y = op.A(x)
            sino = radon(image.astype(np.float64), theta=degrees, circle=False)
            agreement = np.linalg.norm(y[0, 0].numpy().T - sino) / np.linalg.norm(sino)
            ms = median_ms(
                {
                    "A": lambda: op.A(x),
                    "AT": lambda: op.A_adjoint(y),
                    "A_grid": lambda: grid_only.A(x),
                    "AT_grid": lambda: grid_only.A_adjoint(y),
                    "FBP": lambda: op.fbp(y),
                    "radon": lambda: radon(image, theta=degrees, circle=False),
                    "BP": lambda: iradon(sino, theta=degrees, output_size=n, filter_name=None, circle=False),
                    "iradon": lambda: iradon(sino, theta=degrees, output_size=n, circle=False),
                },
                repeats,
            )
            rows.append((f"{n}²", n_views, *ms.values(), agreement, build_s))
            print(f"  done {n}² x {n_views} views", flush=True)

    load_end = os.getloadavg()[0]
    lines = [
        f"CPU: {cpu_name()} ({os.cpu_count()} cores), torch.set_num_threads({threads}); torch {torch.__version__}, "
        f"scikit-image {skimage.__version__}; 1-minute load average {load_start:.2f} at the start, {load_end:.2f} at the end.",
        f"Median of {repeats} calls after a warm-up, ms per call, one image (B = C = 1), float32; all "
        "functions are called in turn, so load from other processes affects them alike. *Ours* is the "
        "operator as it runs: sparse matrices where they fit their build budget (the build column, timed "
        "once; – where they do not, and the operator runs `grid_sample`), else `grid_sample` and its input "
        "gradient, timed alone in the two *grid_sample* columns.",
        "",
        "| image | views | ours A | ours Aᵀ (exact) | grid_sample A | grid_sample Aᵀ | matrix build (s) | ours FBP | "
        "skimage radon | skimage BP (unfiltered iradon) | skimage iradon (FBP) | ‖A − radon‖/‖radon‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, views, a, at, a_grid, at_grid, fbp, sk_a, sk_bp, sk_fbp, rel, build_s in rows:
        build = "–" if build_s is None else f"{build_s:.2f}"
        lines.append(f"| {size} | {views} | {a:.1f} | {at:.1f} | {a_grid:.1f} | {at_grid:.1f} | {build} | {fbp:.1f} | "
                     f"{sk_a:.1f} | {sk_bp:.1f} | {sk_fbp:.1f} | {rel:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    table = run(args.repeats, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Radon operator timings\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
