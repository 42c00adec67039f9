"""Verification and reporting over what a secure-fedora run wrote."""
