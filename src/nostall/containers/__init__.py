"""Flat containers for dataset metadata (no copy-on-read), and the check that finds containers needing them."""
