"""Everything the entry points share: one module per job (see docs/ARCHITECTURE.md)."""

__version__ = "0.1.0"
