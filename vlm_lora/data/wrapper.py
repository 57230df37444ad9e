"""``CollatorWrapper``: the base of collators that change another collator's batches."""

from __future__ import annotations


class CollatorWrapper:
    """Base of collators that change another's batches (``PackingCollator``, ``WithLabelledPositions``).

    Attributes other than the call (``check_lengths``, ``skipped``, ...) are the wrapped collator's. It holds
    only the collator (and what a subclass adds), so it pickles into DataLoader workers.
    """

    def __init__(self, collate):
        self.collate = collate

    def __getattr__(self, name: str):
        if name == "collate":  # not set yet (unpickling): avoid recursing into ourselves
            raise AttributeError(name)
        return getattr(self.collate, name)
