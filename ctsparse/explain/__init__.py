"""checkpoint + scan -> saliency on the sites, mapped back to the scan's grid (`ctsparse explain`).

`explain_volume(model, volume, ckpt)` explains one Volume in memory and returns an Explanation
(the map on the sites and on the volume's grid, the peak, the classes); `explain(checkpoint,
inputs, out_dir)` runs it over scans and writes the files. Methods: methods.METHODS.
"""

from ctsparse.explain.core import Explanation, class_index, explain_volume, sites_to_grid
from ctsparse.explain.methods import METHODS
from ctsparse.explain.run import explain

__all__ = ["METHODS", "Explanation", "class_index", "explain", "explain_volume", "sites_to_grid"]
