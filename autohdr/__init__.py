"""autohdr: lens-distortion correction by predicted warps, and a training-debug diagnostic suite."""

__version__ = "0.1.0"
