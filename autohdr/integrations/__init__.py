"""autohdr on other training frameworks, each behind an optional extra.

* :mod:`autohdr.integrations.lightning`: ``AutohdrCallback`` for a PyTorch Lightning ``Trainer``
  (``pip install 'autohdr[lightning]'``; see ``docs/lightning.md``).

Importing this package imports no framework: each integration imports its own when it is imported.
"""
