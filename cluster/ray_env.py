"""Starting or joining Ray. A local Ray stays on 127.0.0.1."""

from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger(__name__)


def init_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None,
             num_gpus: Optional[int] = None, log_to_driver: bool = True) -> str:
    """Join ``address`` (or $RAY_ADDRESS), else start a loopback-only local Ray.

    Returns "local" or the address joined.
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = dict(logging_level=logging.WARNING, log_to_driver=log_to_driver)
    if address:
        ray.init(address=address, **quiet)
        log.info("joined Ray cluster at %s", address)
        return address
    # Loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 must be in the environment before Ray is
    # first imported (the CLI sets it; see cluster.cli.loopback_only_ray), plus the node IP here.
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        log.warning("starting a local Ray that may listen beyond loopback: set "
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported")
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        **quiet,
    )
    log.info("started local Ray on 127.0.0.1 (%s)", ray.cluster_resources())
    return "local"
