"""ctsparse: CT scan classification with sparse 3D convolutions.

The data flow is scan -> Volume -> SparseVolume -> Batch -> model -> predictions. Heavy modules
(torch, MinkowskiEngine) are imported only by the stages that need them.
"""

import warnings

__version__ = "0.1.0"

# MinkowskiEngine warns on every import of a CPU-only build; `ctsparse doctor` reports the build
# instead of every command repeating it.
warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY flag.*", category=UserWarning)
