"""Deriving the discrete architecture from a search (``python -m fastdarts.derive``)."""
