"""The client: run a model whose blocks live in the swarm (DESIGN.md section 7, architecture.md section 10).

Contract: keeps tokens, embeddings, final norm and LM head on this machine; only hidden states leave
it. Modules: ``routing`` (pure route planner), ``swarm`` (``SwarmView``: client-mode peer, cached
coverage, RTTs), ``session`` (``InferenceSession``: one server session per hop, push routes, input
history per span), ``model`` (``DistributedModel``: the Python API, same tokens as ``LocalModel``).
Never imports ``server``; the network only through ``meshinfer.p2p``. Import the submodules (this
package module stays import-light).
"""
