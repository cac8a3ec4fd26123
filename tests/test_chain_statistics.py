"""benchmarks/bench_chain_statistics.py: each chain's patch KL apart, scored by the product's KL z-score."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from benchmark_modules import load_benchmark  # noqa: E402

OPTIONS = "--views 12 --noise 0.02 --steps 6 --samples 2 --patch 4 --sigma-window 0.01 0.5"


def test_chain_statistics_sample_once_and_score_every_statistic(tiny_prior: Path, tmp_path: Path, monkeypatch) -> None:
    bench = load_benchmark("bench_chain_statistics.py")
    out, cache = tmp_path / "chains.md", tmp_path / "cache"
    args = ["--splits", "1", "--n", "3", "--reference", "4", "--options", OPTIONS, "--prior", str(tiny_prior),
            "--cache", str(cache), "--out", str(out)]
    assert bench.main(args) == 0
    with np.load(cache / "split1.npz") as f:
        kl, inside = f["kl"], f["inside"]
    assert kl.shape[:2] == (6, 2) and inside.shape == (6, *kl.shape[2:]) and (kl >= 0).all()
    assert not np.allclose(kl[:, 0], kl[:, 1])  # two chains, two random streams
    doc = json.loads(out.with_suffix(".json").read_text())
    assert set(doc["results"]) == set(bench.STATISTICS)
    for per_split in doc["results"].values():
        assert 0 <= per_split["1"]["dataset_auroc"] <= 1
    def table() -> list[str]:
        return [line for line in out.read_text().splitlines() if line.startswith("|")]

    first = table()
    assert len(first) == 2 + len(bench.STATISTICS) and first[0].endswith("| pooled |")
    # a rerun scores the cached chains and samples nothing
    monkeypatch.setattr(bench, "posterior_sample_slices", lambda *a, **k: pytest.fail("sampled again"))
    assert bench.main(args) == 0
    assert table() == first


def test_the_statistics_of_two_chains() -> None:
    bench = load_benchmark("bench_chain_statistics.py")
    kl = np.array([[[1.0, 4.0]], [[3.0, 0.0]]])  # (chains, rows, cols)
    floor = 1e-3
    values = {name: f(kl) for name, f in bench.STATISTICS.items()}
    np.testing.assert_allclose(values["log of the chains' mean KL (the product)"], np.log([[2.0 + floor, 2.0 + floor]]))
    np.testing.assert_allclose(values["mean of the chains' log KL"], [[np.log(1 + floor) / 2 + np.log(3 + floor) / 2,
                                                                        np.log(4 + floor) / 2 + np.log(floor) / 2]])
    np.testing.assert_allclose(values["log of the smallest chain's KL"], np.log([[1 + floor, floor]]))
    np.testing.assert_allclose(values["log of the largest chain's KL"], np.log([[3 + floor, 4 + floor]]))
