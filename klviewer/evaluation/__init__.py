"""Detection and localisation metrics, baselines and benchmark reports."""
