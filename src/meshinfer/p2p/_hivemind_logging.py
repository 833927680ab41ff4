"""Route hivemind's log records through the application's logging configuration.

Contract: imported first by every ``meshinfer.p2p`` submodule that imports hivemind (before it does). hivemind installs
its own handler on the ``hivemind`` logger at import and resets that logger's level from
``HIVEMIND_LOGLEVEL``, which would ignore how the CLI configured logging (``-v`` or not). This
module remembers the level the application set, lets hivemind's records propagate to the root
logger like any other library's, and restores that level. No other effect.
"""

from __future__ import annotations

import logging

_app_level = logging.getLogger("hivemind").level

import hivemind.utils.logging as _hm_logging  # noqa: E402 - must come after reading the level

_hm_logging.use_hivemind_log_handler("nowhere")
logging.getLogger("hivemind").setLevel(_app_level)
