"""A host tier's pages, moved to and from device memory many at a time (``PinnedPages``)."""

from ._table import PinnedPages

__all__ = ["PinnedPages"]
