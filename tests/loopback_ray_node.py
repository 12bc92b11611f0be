"""``ray start`` for a second node of a cluster on this machine, bound to 127.0.0.1.

Usage: ``python tests/loopback_ray_node.py start --address=127.0.0.1:PORT --node-ip-address=127.0.0.1 ...``
(the arguments of ``ray start``; the head is a plain ``ray start --head``).

Ray has one switch for two things: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes every process it
starts listen on 127.0.0.1 (what tests must do), and it also makes ``ray start`` refuse to join
an existing cluster (its guard against multi-node on macOS/Windows). This wrapper lets the
command itself pass the guard while every process it starts still gets the loopback setting, and
keeps the head's address as given (with the guard passed, Ray would rewrite 127.0.0.1 into the
machine's routable address). Everything else is ``ray start`` unchanged.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"  # read once, at import: passes the guard
    from ray._private import services

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # what the raylet and agents inherit
    services.resolve_ip_for_localhost = lambda host: host
    from ray.scripts.scripts import main

    sys.argv[0] = "ray"
    sys.exit(main())
