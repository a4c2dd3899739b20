"""Model families, one package each (see docs/DEVELOPING.md)."""
