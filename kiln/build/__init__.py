"""The builder: checkpoint + build config -> engine; refit of weights into an engine."""
from kiln.build.builder import build
from kiln.build.refit import refit

__all__ = ["build", "refit"]
