"""The batch manifest: which studies exist, which are finished, and the settings they share.

`manifest.json` is rewritten atomically whenever studies finish (one save covers every study that
finished since the last), so a killed batch loses at most the studies that were running. It also pins the settings: a re-run with different analysis settings,
slice choice or prior weights is refused instead of mixing incomparable results in one folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from klviewer import __version__
from klviewer.batch.discover import StudyJob
from klviewer.errors import KlviewerInputError, brief
from klviewer.inference.escalation import Escalation
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.json_input import Fields, read_json
from klviewer.io.safe_write import atomic_write_text

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
MAX_MANIFEST_BYTES = 1 << 30
STUDIES_DIR = "studies"

PENDING, DONE, FAILED = "pending", "done", "failed"
EXECUTION_ONLY = ("device",)
"""Settings that choose where a study runs, not what it computes: they may differ between runs."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def batch_config(settings: AnalysisSettings, slices: str, prior_name: str, prior_sha256: str,
                 escalation: Escalation | None = None) -> dict[str, Any]:
    """What every study of one batch must share for its results to be comparable."""
    analysis = {k: v for k, v in settings.to_dict().items() if k not in EXECUTION_ONLY}
    if escalation is not None:  # absent otherwise, so manifests written before two stages still match
        analysis["escalation"] = {"samples": escalation.samples, "rate": escalation.rate}
    return {"settings": analysis, "slices": slices, "prior": {"name": prior_name, "sha256": prior_sha256}}


@dataclass
class StudyRecord:
    id: str
    key: str
    kind: str
    source: str
    """The study's folder (DICOM) or file (array, sinogram)."""
    files: int
    patient_id: str = ""
    study_uid: str = ""
    description: str = ""
    date: str = ""
    status: str = PENDING
    reason: str | None = None
    traceback: str | None = None
    results: str = ""
    """The study's results folder, relative to the batch folder (studies/<id>)."""
    slices: int = 0
    flagged: int = 0
    seconds: float | None = None
    device: str | None = None
    worker: str | None = None
    finished: str | None = None
    attempts: int = 0
    export: dict[str, Any] | None = None

    @classmethod
    def from_job(cls, job: StudyJob) -> "StudyRecord":
        source = job.inputs[0] if len(job.inputs) == 1 else os.path.commonpath(job.inputs)
        return cls(id=job.id, key=job.key, kind=job.kind, source=source, files=len(job.inputs),
                   patient_id=job.patient_id, study_uid=job.study_uid, description=job.description, date=job.date,
                   results=f"{STUDIES_DIR}/{job.id}")


def _study_record(fields: Fields) -> StudyRecord:
    """One study of the manifest, each field of the type StudyRecord declares."""
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(StudyRecord):
        if spec.name not in fields:
            if spec.default is dataclasses.MISSING:
                raise fields.refuse(spec.name, "is missing")
            continue
        kind = str(spec.type)
        if spec.name == "export":
            values[spec.name] = None if fields.get("export") is None else fields.section("export").doc
        elif kind.startswith("int"):
            values[spec.name] = fields.integer(spec.name, lo=0)
        elif kind.startswith("float"):
            values[spec.name] = fields.number(spec.name, lo=0, optional=True)
        else:
            values[spec.name] = fields.text(spec.name, max_chars=1 << 16, optional="None" in kind)
    return StudyRecord(**values)


@dataclass
class Manifest:
    path: Path
    config: dict[str, Any]
    inputs: list[str] = field(default_factory=list)
    studies: dict[str, StudyRecord] = field(default_factory=dict)
    created: str = field(default_factory=now_iso)

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        try:
            doc = Fields(read_json(path, MAX_MANIFEST_BYTES, "batch manifest"), path, what="manifest field")
            if doc.get("klviewer_batch", None) != MANIFEST_FORMAT:
                raise doc.refuse("klviewer_batch", f"is {brief(doc.get('klviewer_batch', None))}, expected {MANIFEST_FORMAT}")
            studies = {}
            for number, raw in enumerate(doc.items("studies")):
                record = _study_record(Fields(raw, path, f"studies[{number}].", what="manifest field"))
                studies[record.id] = record
            inputs = doc.items("inputs")
            if not all(isinstance(i, str) for i in inputs):
                raise doc.refuse("inputs", "must list the input paths as strings")
            return cls(path=path, config=doc.section("config").doc, inputs=list(inputs), studies=studies,
                       created=doc.text("created", max_chars=64))
        except KlviewerInputError as exc:
            raise KlviewerInputError(path, f"not a readable klviewer batch manifest ({exc.problem}); "
                                           "repair it or use a new --out folder") from exc

    def require_config(self, config: dict[str, Any]) -> None:
        """Refuse to add results made with other settings, naming every difference."""
        differences = []
        for section in ("settings", "slices", "prior"):
            then, now = self.config.get(section), config.get(section)
            if section == "prior":
                then, now = (then or {}).get("sha256"), (now or {}).get("sha256")
                if then != now:
                    differences.append(f"prior weights (sha256 {str(then)[:12]}... then, {str(now)[:12]}... now)")
            elif isinstance(then, dict) and isinstance(now, dict):
                for key in sorted(set(then) | set(now)):
                    if then.get(key) != now.get(key):
                        differences.append(f"{key} {then.get(key)!r} then, {now.get(key)!r} now")
            elif then != now:
                differences.append(f"{section} {then!r} then, {now!r} now")
        if differences:
            raise KlviewerInputError(self.path, "this batch folder holds results made with other settings: "
                                                + "; ".join(differences)
                                                + ". Re-run with the same settings, or choose a new --out folder")

    def add_inputs(self, inputs: list[str]) -> None:
        self.inputs.extend(i for i in inputs if i not in self.inputs)

    def records(self) -> list[StudyRecord]:
        return [self.studies[k] for k in sorted(self.studies)]

    def save(self) -> None:
        # One study per line: readable, and much faster to write than indented JSON, which
        # matters because the file is rewritten after every study of batches of thousands.
        head = {
            "klviewer_batch": MANIFEST_FORMAT,
            "klviewer_version": __version__,
            "created": self.created,
            "updated": now_iso(),
            "config": self.config,
            "inputs": self.inputs,
        }
        lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + ['  "studies": [']
        lines.append(",\n".join("    " + json.dumps(vars(r)) for r in self.records()))
        lines += ["  ]", "}", ""]
        atomic_write_text(self.path, "\n".join(lines), overwrite=True)
