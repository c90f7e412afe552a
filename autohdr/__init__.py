"""autohdr: lens-distortion correction by predicted warps, and a training-debug diagnostic suite."""

__version__ = "0.1.0"

__all__ = ["attach", "watch_loss"]


def __getattr__(name: str):
    """``autohdr.attach`` / ``autohdr.watch_loss``, imported on first use (``import autohdr`` stays
    cheap for the command line)."""
    if name in __all__:
        import importlib
        return getattr(importlib.import_module("autohdr.attachment"), name)
    raise AttributeError(f"module 'autohdr' has no attribute {name!r}")
