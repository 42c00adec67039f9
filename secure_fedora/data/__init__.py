"""Datasets, user data sources and partitioners (imports only core)."""
