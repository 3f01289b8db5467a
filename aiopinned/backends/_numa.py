"""Which NUMA node a pool's memory goes on: ``PinnedPool(numa_node=...)``.

``None`` leaves placement to the kernel (the first touch decides); an ``int`` is that node;
``"auto"`` is the node the device hangs off, as sysfs reports it for its PCI address.  Where the
system reports none (a single-node host, most VMs: ``-1``), ``"auto"`` places nothing and says so
in a log line.  The memory is placed before its first touch (``_memory.place``).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("aiopinned")
SYS = Path("/sys")


def node_of_pci(bus_id: str, sys_root: Path = SYS) -> int | None:
    """The NUMA node of a PCI device (``0000:3b:00.0``), or ``None`` where none is reported."""
    path = sys_root / "bus" / "pci" / "devices" / bus_id.lower() / "numa_node"
    try:
        node = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def nodes(sys_root: Path = SYS) -> list[int]:
    """The NUMA nodes this host has (``[0]`` where sysfs shows none)."""
    found = sorted(
        int(p.name[4:])
        for p in (sys_root / "devices" / "system" / "node").glob("node*")
        if p.name[4:].isdigit()
    )
    return found or [0]


def resolve(
    numa_node: int | str | None, bus_id: str | None, where: str, sys_root: Path = SYS
) -> int | None:
    """The node to place memory on, for a pool whose device is at ``bus_id`` (``None``: no
    device) and is called ``where`` in messages.

    Raises:
        ValueError: ``numa_node`` names a node this host does not have.
    """
    if numa_node is None:
        return None
    if numa_node == "auto":
        node = None if bus_id is None else node_of_pci(bus_id, sys_root)
        if node is None:
            log.info("aiopinned: numa_node='auto': %s reports no NUMA node; placement is left "
                     "to the kernel", where)  # fmt: skip
        else:
            log.info("aiopinned: numa_node='auto': %s is on node %d", where, node)
        return node
    have = nodes(sys_root)
    if numa_node not in have:
        raise ValueError(f"numa_node={numa_node}: this host's NUMA nodes are {have}")
    return int(numa_node)


def placement(ptr: int, proc: Path = Path("/proc/self")) -> tuple[str, dict[int, int]] | None:
    """Where the mapping holding address ``ptr`` lives: its NUMA policy (``default``,
    ``prefer:1``...) and its resident bytes per node, from ``numa_maps`` (``None`` where the
    kernel has no such file)."""
    try:
        lines = (proc / "numa_maps").read_text().splitlines()
    except OSError:
        return None
    fields = [line.split() for line in lines]
    held = [f for f in fields if int(f[0], 16) <= ptr]
    if not held:
        return None
    _, policy, *rest = max(held, key=lambda f: int(f[0], 16))
    items = dict(item.partition("=")[::2] for item in rest if "=" in item)
    page = int(items.get("kernelpagesize_kB", "4")) << 10
    nodes = {
        int(k[1:]): int(v) * page for k, v in items.items() if k[:1] == "N" and k[1:].isdigit()
    }
    return policy, nodes
