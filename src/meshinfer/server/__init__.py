"""meshinfer.server: block servers (docs/architecture.md sections 6 and 10).

Modules: ``config`` (``ServerConfig``), ``device`` (``--device``/``--dtype`` resolved at start, the KV
budget sized on a GPU), ``memory`` (KV budget admission, pure), ``session`` (one
session's state and step checks, pure), ``runtime`` (the batching step loop: schedule -> execute ->
deliver), ``push`` (pooled ``meshinfer/push/1`` streams to next hops), ``handler`` (the
``meshinfer/session/1`` and push handlers), ``throughput`` (start-up measurement, single and batched),
``placement`` (block selection, pure) and ``rebalance`` (placement and moves over injected reads),
``metrics`` (Prometheus), ``app`` (the composition root ``BlockServer``) and ``run`` (the process:
``serve_until_signal``). Never imports the client.
"""
