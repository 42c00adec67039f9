"""Foundations every layer may import: config schema, registries, plug-in loading, errors, crash points."""
