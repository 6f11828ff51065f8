"""ExecuTorch export of a phone's training programs, and the virtual phone that runs them."""

import logging
import warnings

# ExecuTorch and torchao announce experimental APIs, deprecated resource readers and CUDA
# kernels this CPU build cannot load, on every import and call; none of it is actionable here.
logging.getLogger("torchao").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module=r"executorch(\.|$)")
warnings.filterwarnings("ignore", message=r".*experimental.*", category=FutureWarning)

from fedmilm.export.bundle import (  # noqa: E402
           ExportTimings,
           export_bundle,
           export_fingerprint,
           micro_batch_of,
)
from fedmilm.export.manifest import Manifest  # noqa: E402
from fedmilm.export.ptd import read_ptd, write_ptd  # noqa: E402
from fedmilm.export.runtime import PhonePrograms, cached_programs, train_with_programs  # noqa: E402

__all__ = ["ExportTimings", "Manifest", "PhonePrograms", "cached_programs", "export_bundle",
           "export_fingerprint", "micro_batch_of", "read_ptd", "train_with_programs",
           "write_ptd"]
