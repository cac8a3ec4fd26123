"""`klviewer batch --ray`: studies on Ray actors give the same bits as a local run.

One local Ray instance (2 CPUs, no dashboard) serves the whole module; starting it costs seconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_batch_support import (  # noqa: F401 (one_torch_thread is an autouse fixture)
    N_STUDIES,
    SETTINGS,
    assert_same_results,
    batch_cli,
    cli_args,
    make_archive,
    manifest,
    one_torch_thread,
)

from klviewer.batch import RayBackend, run_batch

ray = pytest.importorskip("ray", reason="ray is not installed (optional extra klviewer[cluster])")


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_archive(tmp_path_factory.mktemp("archive"))


def test_ray_actors_give_the_same_bits_as_a_local_run(ray_session: None, archive: Path, tiny_prior: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    local = tmp_path / "local"
    run_batch([archive], local, SETTINGS, prior=tiny_prior)

    # `--ray auto` joins the running instance, as it would join a cluster started with `ray start`.
    on_ray = tmp_path / "ray"
    assert batch_cli([str(archive), "--out", str(on_ray), "--ray", "auto", *cli_args(tiny_prior)]) == 0
    assert "analysed on 2 Ray CPU actor(s)" in capsys.readouterr().out
    studies = manifest(on_ray)["studies"]
    assert len(studies) == N_STUDIES and {s["status"] for s in studies} == {"done"}
    workers = {s["worker"] for s in studies}
    assert workers and not any(w.endswith(f":{os.getpid()}") for w in workers), "studies ran in Ray workers"
    assert_same_results(on_ray, local)
    assert ray.is_initialized(), "a session the batch did not start is left running"


def test_ray_resumes_a_local_batch_and_caps_the_actors(ray_session: None, archive: Path, tiny_prior: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "batch"
    run_batch([archive], out, SETTINGS, prior=tiny_prior, slices="0")
    doc = manifest(out)
    doc_ids = sorted(s["id"] for s in doc["studies"])
    (out / "studies" / doc_ids[0]).rename(tmp_path / "moved-away")
    result = run_batch([archive], out, SETTINGS, prior=tiny_prior, slices="0", backend=RayBackend(max_actors=1))
    assert result.ran == [doc_ids[0]] and result.backend == "1 Ray CPU actor(s)"
    assert any("missing or incomplete" in w for w in result.warnings)
    assert len(result.rows) == N_STUDIES, "slice 0 of each study"
