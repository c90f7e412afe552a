"""autohdr in the user's own test suite: a pytest plugin configured by ``[tool.autohdr]``.

One module per job: :mod:`~autohdr.testing.config` (the table and the ``--autohdr-*`` options),
:mod:`~autohdr.testing.plugin` (the ``pytest11`` entry point; off unless configured),
:mod:`~autohdr.testing.collection` (adds the generated tests), :mod:`~autohdr.testing.signal_tests`
(the tests), :mod:`~autohdr.testing.fixtures` (fixtures for the user's tests),
:mod:`~autohdr.testing.runs` (a judged run: the Trainer or the user's loop),
:mod:`~autohdr.testing.shared_runs` (once per session across xdist workers) and
:mod:`~autohdr.testing.benchmark` (the GPU throughput step).
"""

__all__ = ["JudgedRun", "RunSettings"]


def __getattr__(name: str):
    """``JudgedRun`` and ``RunSettings``, imported on first use: the entry point loads this package in
    every pytest session, and an unconfigured session must not pay for importing torch."""
    if name in __all__:
        from autohdr.testing import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'autohdr.testing' has no attribute {name!r}")
