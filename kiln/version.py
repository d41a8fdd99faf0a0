"""kiln's version, recorded in every engine."""
__version__ = "0.1.0"
