"""Reusable privacy and security primitives: accountants, mechanisms, DP-SGD, ledger, keys, CKKS.

This package knows nothing of FEDORA.
"""
