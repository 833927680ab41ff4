"""meshinfer: peer-to-peer LLM inference ("BitTorrent for AI").

The package root only names the version; import the layer you need (see docs/architecture.md).
"""

__version__ = "0.1.0"
