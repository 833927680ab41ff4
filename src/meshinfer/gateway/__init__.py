"""meshinfer.gateway: not built yet (see docs/architecture.md)."""
