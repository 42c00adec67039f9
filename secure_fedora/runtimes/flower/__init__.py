"""Secure deployment of FEDORA on Flower 1.42: real processes, TLS, authenticated nodes.

- :mod:`secure_fedora.runtimes.flower.certs`: CA, server certificate (SANs) and SuperNode EC keys.
- :mod:`secure_fedora.runtimes.flower.server_app` / :mod:`secure_fedora.runtimes.flower.client_app`: the Flower
  ServerApp and ClientApp running FEDORA with the shared algorithm core (plain, noised,
  encrypted or noised+encrypted summaries; DP-SGD, budgets and signed ledgers enforced by
  each client).
- :mod:`secure_fedora.runtimes.flower.envelopes`: signed envelopes on every Flower message (allowlist,
  content digest, on-disk nonce memory).
- :mod:`secure_fedora.runtimes.flower.ceremony`: the key holder's CKKS keys on its own disk; the
  encrypted-relatedness protocol itself is :mod:`secure_fedora.secure.relatedness`, whose steps
  the apps run in each party's process.
- :mod:`secure_fedora.runtimes.flower.protocol`: message layout, run and node config validation.
- :mod:`secure_fedora.runtimes.flower.state`: a SuperNode's crash-safe state on its own disk.
- :mod:`secure_fedora.runtimes.flower.local`: a complete deployment on 127.0.0.1 (SuperLink + N
  SuperNodes), started, run and stopped.
- :mod:`secure_fedora.runtimes.flower.processes`: process groups and descendants, stopped reliably.
- :mod:`secure_fedora.runtimes.flower.cli`: the ``secure-fedora deploy`` commands.
- ``flwr_app/pyproject.toml``: the Flower app definition (``[tool.flwr.app]``).

Importing this package imports nothing heavy; Flower and torch load with the submodules.
"""
