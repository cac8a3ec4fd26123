"""A small fixed-seed run of the hostile-input fuzzer (benchmarks/fuzz.py; `make fuzz` runs 10,000).

Every input kind is mutated and fed to the `klviewer` command in a child process with time and
memory limits. Nothing may crash, hang, run out of memory or write into its input folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_modules import BENCHMARKS, load_benchmark

FUZZ = BENCHMARKS / "fuzz.py"
INPUTS = 300
SEED = 17


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fuzzer forks children and reads /proc")
def test_hostile_inputs_never_crash_hang_exhaust_memory_or_write_into_inputs(tmp_path: Path) -> None:
    # A fresh process: the fuzzer forks its children from a parent that has run no torch code.
    table = tmp_path / "fuzz.md"
    run = subprocess.run([sys.executable, str(FUZZ), "-n", str(INPUTS), "--seed", str(SEED), "--jobs", "2",
                          "--timeout", "60", "--memory-gib", "3", "--work", str(tmp_path / "work"), "--out", str(table)],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [int(x) for x in line.split("|")[2:-1]]
            for line in table.read_text().splitlines() if line.startswith("| ") and "tried" not in line}
    tried, accepted, refused, *bad = rows["**all**"]
    assert tried == INPUTS and bad == [0, 0, 0, 0], rows
    assert accepted > 0 and refused > 0, "mutations both pass and get refused"
    assert all(row[0] > 0 for row in rows.values()), f"every input kind is tried: {rows}"


def test_the_fuzzer_tells_each_outcome_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The classifier itself, on stand-ins for the klviewer command that refuse, crash, hang, exhaust
    memory or write into their input."""
    import klviewer.cli

    fuzz = load_benchmark(FUZZ.name)

    def command(argv: list[str]) -> int:
        action, folder = argv[0], Path(argv[1])
        if action == "refuse":
            return 2
        if action == "crash":
            raise ValueError("a bug")
        if action == "hang":
            while True:
                pass
        if action == "oom":
            return len(bytearray(8 << 30))
        if action == "write":
            (folder / "written.txt").write_text("x")
        return 0

    monkeypatch.setattr(klviewer.cli, "main", command)
    actions = ("accept", "refuse", "crash", "hang", "oom", "write")
    cases = []
    for i, action in enumerate(actions):
        folder = tmp_path / action / "input"  # the fuzzer removes a passing case's parent folder
        folder.mkdir(parents=True)
        (folder / "a.json").write_text("{}")
        cases.append(fuzz.Case(i, "arrays", folder, [action, str(folder)], tmp_path / f"out{i}"))
    outcomes = {o.case.argv[0]: o for o in fuzz.run_cases(cases, jobs=2, timeout=3.0, memory_budget=1 << 30)}
    assert {a: outcomes[a].outcome for a in actions} == {
        "accept": "accepted", "refuse": "clean error", "crash": "crash", "hang": "hang", "oom": "out of memory",
        "write": "wrote into input"}
    assert outcomes["crash"].detail.startswith("ValueError at test_fuzz.py:")
