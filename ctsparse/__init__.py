"""ctsparse: CT scan classification with sparse 3D convolutions.

The data flow is scan -> Volume -> SparseVolume -> Batch -> model -> predictions. Heavy modules
(torch, MinkowskiEngine) are imported only by the stages that need them.
"""

__version__ = "0.1.0"
