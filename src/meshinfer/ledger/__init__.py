"""Credits (issue 23): usage receipts signed by clients, the books servers keep of them, balances and the priority
they buy.

Layout: ``receipts`` (sign and verify, with the peer's key), ``book`` (pure: which receipts count, balances),
``priority`` (pure: the order a contended server serves sessions in), ``store`` (a server's SQLite file of
receipts). Sits above ``meshinfer.p2p`` (it verifies with peer keys) and below ``client``/``server``.
"""
