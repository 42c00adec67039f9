"""Experiments built on the runtimes: sweeps, late joiners, plots."""
