"""ExecuTorch export of a phone's training programs, and the virtual phone that runs them."""

from fedmilm.export.bundle import ExportTimings, export_bundle, export_fingerprint, micro_batch_of
from fedmilm.export.manifest import Manifest
from fedmilm.export.ptd import read_ptd, write_ptd
from fedmilm.export.runtime import PhonePrograms, cached_programs, train_with_programs

__all__ = ["ExportTimings", "Manifest", "PhonePrograms", "cached_programs", "export_bundle",
           "export_fingerprint", "micro_batch_of", "read_ptd", "train_with_programs",
           "write_ptd"]
