"""The OpenAI-compatible HTTP API on top of the swarm (``meshinfer api``).

Contract: built only on the client's public API (``DistributedModel``: ``tokenizer``, ``spec``, ``astream`` on
``model.loop``, its swarm view for ``/health``); never imports ``server``, and reaches the network only through
the client. Modules: ``requests`` (pure: request validation, OpenAI errors), ``responses`` (pure: response
bodies, SSE framing, stop strings), ``generation`` (the ``Generator`` protocol, ``SwarmGenerator``, token ids to
text), ``config`` (``GatewayConfig``, ``HttpLimits``), ``body`` (reading a body under its size and time
limits), ``app`` (the FastAPI app), ``httpguard`` (uvicorn's h11 protocol with a request-head deadline),
``serving`` (uvicorn). Import the submodules; this package module stays import-light.
"""
