"""meshinfer.server: block servers (docs/architecture.md sections 6 and 10).

Modules: ``config`` (``ServerConfig``), ``memory`` (KV budget admission, pure), ``session`` (one
session's state and step checks, pure), ``runtime`` (the step loop: schedule -> execute -> deliver on
one compute thread), ``push`` (pooled ``meshinfer/push/1`` streams to next hops), ``handler`` (the
``meshinfer/session/1`` and push handlers), ``throughput`` (start-up measurement) and ``app`` (the
composition root ``BlockServer`` / ``serve_until_signal``). Never imports the client.
"""
