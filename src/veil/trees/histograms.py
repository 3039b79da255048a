"""One member's gradient and hessian histograms per frontier node, tree group, feature and bin.

The histograms of one tree level form one flat vector, the member's input to the level's secure
sum:

    shape (slots, groups, 2, features, bins): [node][tree group][G | H][feature][bin]

`slots` is fixed for the run (the widest level, ``2 ** (max_depth - 1)``), so every level's
vector has the same length and the secure sum's layout never changes; slots of nodes that do
not exist (yet) hold zeros. A record lies in exactly one node and, per feature, one bin: it adds
its (clipped) g and h to one entry per feature and group, which is what the DP sensitivity
counts (`federated.histogram_sensitivity`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["HistogramShape", "node_histograms"]


class HistogramShape:
    """The shape of a level's histograms; `size` entries once flattened."""

    def __init__(self, slots: int, groups: int, features: int, bins: int) -> None:
        if min(slots, groups, features, bins) < 1:
            raise ValueError("histogram dimensions must be >= 1")
        self.slots, self.groups, self.features, self.bins = slots, groups, features, bins

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.slots, self.groups, 2, self.features, self.bins)

    @property
    def size(self) -> int:
        return self.slots * self.groups * 2 * self.features * self.bins


def node_histograms(
    bins: npt.NDArray[np.int32],
    node: npt.NDArray[np.int64],
    g: npt.NDArray[np.float64],
    h: npt.NDArray[np.float64],
    shape: HistogramShape,
) -> npt.NDArray[np.float64]:
    """The histograms of `shape` for rows with bin indices `bins` ``(n, features)``, frontier
    slot `node` ``(n, groups)`` in each group's tree (-1: the row sits in a finished leaf of
    that tree and adds nothing to it), gradients and hessians ``(n, groups)``. Entry
    ``[s, k, 0, j, b]`` is the sum of g[:, k] over the rows in slot s of group k's tree whose
    feature j falls in bin b; ``[s, k, 1, j, b]`` the same for h."""
    out = np.zeros(shape.shape, dtype=np.float64)
    if (node >= shape.slots).any():
        raise ValueError(f"a row's node slot exceeds the {shape.slots} slots of the histograms")
    f, nb = shape.features, shape.bins
    cells = shape.slots * f * nb
    columns = np.arange(f, dtype=np.int64)[None, :]
    for k in range(shape.groups):
        active = node[:, k] >= 0
        if not active.any():
            continue
        slot = node[active, k].astype(np.int64)
        flat = ((slot[:, None] * f + columns) * nb + bins[active].astype(np.int64)).reshape(-1)
        for part, values in ((0, g[active, k]), (1, h[active, k])):
            summed = np.bincount(flat, weights=np.repeat(values, f), minlength=cells)
            out[:, k, part] = summed.reshape(shape.slots, f, nb)
    return out
