"""Federated methods and FEDORA's math as plain functions over tensors (imports core, data, learning)."""
