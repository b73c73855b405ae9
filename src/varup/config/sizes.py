"""Sample sizes the metrics need (checked at planning time, asserted again by the metrics)."""
from __future__ import annotations


def min_set_size(prc_neighborhood: int, prdc_nearest_k: int) -> int:
    """Smallest generated / real set the neighbourhood metrics accept: PRDC takes the (k+1)-th nearest neighbour
    of every point among the others (k + 2 points), torch-fidelity's PR the (k+1)-th including itself."""
    return max(2, prc_neighborhood + 1, prdc_nearest_k + 2)
