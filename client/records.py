"""Conversion between the site's ``{state-dict key: numpy array}`` and Flower's ``ArrayRecord``.

The server keeps its own pair (``server.strategies.to_record`` / ``to_numpy``): ``client`` and ``server``
never import each other, and ``medseg_core`` never imports Flower.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from medseg_core.federation import arrays_to_numpy, wire_arrays


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as ``{key: numpy array}``."""
    return arrays_to_numpy(record.items())


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``{key: numpy array}`` as an ArrayRecord, keys in order and shapes kept (``wire_arrays``)."""
    return ArrayRecord({k: Array(v) for k, v in wire_arrays(arrays).items()})
