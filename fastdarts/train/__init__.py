"""Training a derived genotype from scratch: ``python -m fastdarts.train``."""
