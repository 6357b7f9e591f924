"""qpack's version (its own module, so that any module can import it without a cycle)."""

__version__ = "1.0.0"
