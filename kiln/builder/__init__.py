"""The builder: checkpoint + build config -> engine; refit of weights into an engine."""
from kiln.builder.builder import build
from kiln.builder.refit import refit

__all__ = ["build", "refit"]
