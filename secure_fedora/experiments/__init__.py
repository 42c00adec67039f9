"""Experiments built on the runtimes: sweeps and late joiners."""
