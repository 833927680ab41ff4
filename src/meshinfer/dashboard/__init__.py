"""The read-only web view of the swarm (``meshinfer dashboard``, and ``/`` of ``meshinfer api``).

Contract: built on ``p2p`` reads (a client-mode ``PeerNode``; never ``server``) and plain JSON. Modules:
``doc`` (pure: the swarm document ``meshinfer swarm --json`` prints, plus the page's payload), ``rtt`` (which
servers to ping next, and the ping itself), ``poller`` (``SwarmPoller``: background refresh on the node's loop;
``NodeSwarmReader``), ``page`` (the self-contained HTML page), ``auth`` (the key: bearer header or sign-in
cookie), ``app`` (FastAPI: ``create_app``,
``dashboard_router``). Import the submodules; this package module stays import-light (``meshinfer --help``
imports ``doc`` through ``meshinfer swarm``).
"""
