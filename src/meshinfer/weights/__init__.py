"""meshinfer.weights: content-addressed models, fetched from peers piece by piece and verified (issue 9).

Contract: sits above ``p2p`` (streams, DHT records) and ``models`` (file-level helpers: manifests and
fingerprints in ``models.fingerprint``), below ``server`` and ``client``; never imports those. Modules:

- ``manifest``: ``Manifest`` (groups, items, pieces and their hashes; verified against the model id),
  ``Want`` (which part of a model a node needs), ``is_model_id``;
- ``plan``: pure decisions: ``PiecePlanner`` (which piece from which seeder);
- ``bans``: ``PeerBans`` (backoff for failing peers, bans for wrong bytes; the client's failover uses it too);
- ``store``: the local cache (``<cache>/<model_id>/``: memory-mappable safetensors per block, resumable
  partial files, disk budget);
- ``seed``: ``LocalPieces`` (a local checkpoint directory as pieces), ``Seeder``/``start_seeding`` (serve
  ``/meshinfer/pieces/1``, announce ``seed:<model_id>`` records);
- ``fetch``: ``fetch`` and ``ensure_local`` (the entry point for servers and clients);
- ``hub``: the Hugging Face hub path (only the shards a span needs; not reachable from here).

The package imports nothing at import time, so ``import meshinfer.weights.manifest`` stays light; ``seed``
and ``fetch`` import the network.
"""
