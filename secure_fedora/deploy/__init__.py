"""Secure deployment of FEDORA on Flower 1.42: real processes, TLS, authenticated nodes.

- :mod:`secure_fedora.deploy.certs`: CA, server certificate and SuperNode keys.
- :mod:`secure_fedora.deploy.server_app` / :mod:`secure_fedora.deploy.client_app`: the Flower
  ServerApp and ClientApp running FEDORA with the shared algorithm core.
- :mod:`secure_fedora.deploy.local`: a complete local deployment on 127.0.0.1.
- :mod:`secure_fedora.deploy.cli`: the ``secure-fedora deploy`` commands.

Submodules import Flower and torch lazily from here: ``import secure_fedora.deploy`` is cheap.
"""
