"""The data layer: one typed `DataSpec`, one `open_data`, and the source protocol the trainer reads.

Synthetic models (`saelab.synthetic`) and real activations (`saelab.activations`) sit below this
package; the trainer, runs, diagnostics and CLI reach data only through it.
"""

from saelab.data.open import OpenedData, open_data
from saelab.data.protocol import ActivationSource, PairedSource, is_paired
from saelab.data.sources import SyntheticSource, TensorSource, synthetic_stream
from saelab.data.spec import DataSpec

__all__ = [
    "ActivationSource",
    "DataSpec",
    "OpenedData",
    "PairedSource",
    "SyntheticSource",
    "TensorSource",
    "is_paired",
    "open_data",
    "synthetic_stream",
]
