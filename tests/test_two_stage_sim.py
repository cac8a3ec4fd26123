"""The two-stage screening simulation (benchmarks/sim_two_stage.py): which slices escalate, what they cost, and
which score and verdict each slice ends with."""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def sim():
    return load_benchmark("sim_two_stage.py")


def _stages(sim):
    nan = np.nan
    # Four healthy slices, then four lesion slices.
    first = sim.Stage(chains=2, z=np.array([1.0, 2.0, 3.0, 4.0, 2.5, 5.0, 6.0, 7.0]),
                      localisation=np.array([nan] * 4 + [0.6] * 4), flag_threshold=6.5,
                      healthy_calibration_z=np.array([0.0, 1.0, 2.0, 3.0, 4.0]))
    second = sim.Stage(chains=4, z=np.array([9.0, 9.0, 0.0, 0.0, 1.5, 8.0, 8.0, 8.0]),
                       localisation=np.array([nan] * 4 + [0.9] * 4), flag_threshold=5.0,
                       healthy_calibration_z=np.array([0.0]))
    return first, second, np.array([False] * 4 + [True] * 4)


def test_escalated_slices_take_the_second_stage_score_and_verdict(sim) -> None:
    first, second, lesion = _stages(sim)
    o = sim.two_stage(first, second, lesion, rate=0.5)
    # Half of the calibration scores lie above their median, 2.0: healthy 3 and 4 and every lesion escalate.
    assert o.escalate_above == pytest.approx(2.0)
    assert (o.escalated_healthy, o.escalated_lesion) == (0.5, 1.0)
    # Final healthy scores 1, 2, 0, 0 (the two 9s never escalated); lesions 1.5, 8, 8, 8: 15 of 16 pairs ordered.
    assert o.dataset_auroc == pytest.approx(15 / 16)
    assert o.localisation_auroc == pytest.approx(0.9)
    # Two chains everywhere, two more on the escalated: half the healthy slices, six of eight in the mix.
    assert (o.chains_healthy, o.chains_mix) == (pytest.approx(3.0), pytest.approx(3.5))
    # Only escalated slices above stage 2's threshold are flagged.
    assert (o.flagged_healthy, o.flagged_lesion) == (0, 3)


def test_escalating_everything_is_the_second_stage_alone(sim) -> None:
    first, second, lesion = _stages(sim)
    o = sim.two_stage(first, second, lesion, rate=1.0)
    assert o.dataset_auroc == pytest.approx(sim.auroc(second.z, lesion))
    assert (o.chains_healthy, o.chains_mix) == (4.0, 4.0)
    assert (o.flagged_healthy, o.flagged_lesion) == (2, 3)
