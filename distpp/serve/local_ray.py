"""Starting a single-machine Ray whose every listener is on 127.0.0.1.

``ray.init(address="local")`` alone puts the node (GCS, raylet, workers, dashboard agent) on the address
of the machine's default route and binds several ports on all interfaces. Passing
``_node_ip_address="127.0.0.1"`` is not enough on Linux: Ray 2.60 replaces a loopback node address with
the routable one unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's switch for "local Ray only, no
cluster", read when Ray is imported) is set. With it, and with the dashboard and usage stats off, every
listener of the instance is on 127.0.0.1 (checked by the serve tier, ``test_local_ray_is_loopback_only``).

Ray still starts a dashboard head process (its usage-stats module) even with ``include_dashboard=False``;
that process has been seen probing a cloud-metadata address and resolving names over DNS even with
``RAY_USAGE_STATS_ENABLED=0``, which no setting here turns off: run local Ray in a loopback-only network
namespace (``tests/in_loopback_netns.sh``) where that matters.
"""

from __future__ import annotations

import os
import sys

from ..errors import ConfigError
from .http import PROXY_CALLBACK_ENV

LOOPBACK = "127.0.0.1"
# Read by every Ray process at import: set before ray is imported (children inherit the environment).
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def init_local_ray(**kwargs):
    """``ray.init`` of a fresh single-machine instance on 127.0.0.1, dashboard and usage stats off, and
    the Serve HTTP proxy's body limit configured (it starts later, with this environment).

    kwargs: other ``ray.init`` arguments (num_cpus, log_to_driver, ...). Raises ConfigError when ray was
    imported before this call could set its environment, or when the node still is not on loopback.
    """
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        raise ConfigError("ray was imported before distpp.serve.local_ray.init_local_ray could set "
                          "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, so the local Ray would listen on this machine's "
                          "external address; call init_local_ray before importing ray, or export "
                          "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0")
    os.environ.update(LOCAL_RAY_ENV)
    os.environ.update(PROXY_CALLBACK_ENV)  # the HTTP proxy's body limit (distpp.serve.http)
    import ray

    ctx = ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, **kwargs)
    nodes = [n["NodeManagerAddress"] for n in ray.nodes()]
    if nodes != [LOOPBACK]:
        ray.shutdown()
        raise ConfigError(f"the local Ray came up on {nodes}, not {LOOPBACK}; refusing to serve off loopback")
    return ctx


def connect_ray(address: str, node_ip_address: str = LOOPBACK):
    """``ray.init`` joining an existing cluster at ``address`` (``auto`` or host:port) with this driver's
    node IP ``node_ip_address``: 127.0.0.1 by default (a cluster on this machine, started with
    ``ray start --head --node-ip-address 127.0.0.1``); pass this machine's cluster address to join a
    multi-node cluster. Starts nothing: the cluster's own listeners are where its operator put them."""
    import ray

    return ray.init(address=address, _node_ip_address=node_ip_address, include_dashboard=False)
