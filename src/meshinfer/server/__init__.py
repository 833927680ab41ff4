"""meshinfer.server: not built yet (see docs/architecture.md)."""
