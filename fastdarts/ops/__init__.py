"""Fast ops and the single place that chooses between them and the reference."""
