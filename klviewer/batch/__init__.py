"""Headless batch analysis over many studies: resumable, on this machine or a Ray cluster."""

from klviewer.batch.discover import Discovery, StudyJob, discover_studies
from klviewer.batch.export_step import ExportOptions
from klviewer.batch.local import InProcessBackend, ProcessBackend
from klviewer.batch.manifest import Manifest, StudyRecord
from klviewer.batch.ray_backend import RayBackend
from klviewer.batch.runner import BatchObserver, run_batch
from klviewer.batch.study import SliceProgress
from klviewer.batch.summary import BatchResult

__all__ = [
    "BatchObserver", "BatchResult", "Discovery", "ExportOptions", "InProcessBackend", "Manifest", "ProcessBackend",
    "RayBackend", "SliceProgress", "StudyJob", "StudyRecord", "discover_studies", "run_batch",
]
