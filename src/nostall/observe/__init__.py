"""Observing a run: statistics, memory, CPUs, and the evidence error messages quote."""
