"""Pack variable-length sequences into token-budget rows, longest first, with no padding."""

from __future__ import annotations

from collections.abc import Sequence


def pack_by_budget(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group sequence indices into rows of at most ``budget`` tokens.

    Sequences are taken longest first (ties by index, so packing is deterministic), which puts the
    largest row first: an out-of-memory error shows at once, not an hour into a run. A sequence
    longer than the budget gets a row of its own.

    Args:
        lengths: Token count of each sequence.
        budget: Maximum tokens per row.

    Returns:
        Rows of indices into ``lengths``; every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    used = 0
    for index in order:
        size = lengths[index]
        if rows and used + size <= budget:
            rows[-1].append(index)
            used += size
        else:
            rows.append([index])
            used = size
    return rows
