"""meshinfer.client: not built yet (see docs/architecture.md)."""
