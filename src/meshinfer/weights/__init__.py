"""meshinfer.weights: not built yet (see docs/architecture.md)."""
