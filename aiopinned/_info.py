"""``python -m aiopinned info``: what a deployment needs to know about this machine.

The backend ``auto`` would choose and why; each CUDA device with its NUMA node; the driver's and
the runtime's CUDA versions, cuda-bindings, torch and CuPy; transparent huge pages, the locked
memory limit and the host's memory; and warnings, each with its fix.
"""

from __future__ import annotations

import importlib.metadata
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .backends._hugepages import HUGETLB, hugetlb_pool, thp_setting
from .backends._memory import default_threads
from .backends._numa import node_of_pci as numa_node_of
from .errors import CudaError


@dataclass
class Device:
    index: int
    name: str
    pci_bus_id: str
    #: the host NUMA node the device hangs off (``None``: the system reports none)
    numa_node: int | None


@dataclass
class Info:
    backend: str
    why: str
    devices: list[Device] = field(default_factory=list)
    driver_cuda: str | None = None
    runtime_cuda: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    thp: str | None = None
    thp_defrag: str | None = None
    #: reserved huge pages by page size in bytes: [set aside, free] (None: unknown)
    hugetlb: dict[int, list[int | None]] = field(default_factory=dict)
    memlock_bytes: int | None = None  # None: unlimited
    mem_total_bytes: int | None = None
    mem_available_bytes: int | None = None
    touch_threads: int = 0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _meminfo(proc_root: Path = Path("/proc")) -> dict[str, int]:
    out = {}
    try:
        for line in (proc_root / "meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _cuda(info: Info) -> None:
    from .backends._cudart import cuda_unusable_reason, pci_bus_id, rt

    reason = cuda_unusable_reason()
    info.backend, info.why = ("cuda", "a CUDA device is usable") if reason is None else (
        "host", f"no usable CUDA device: {reason}")  # fmt: skip
    if rt is None:  # cuda-bindings is not importable
        return
    err, driver = rt.cudaDriverGetVersion()
    if err == rt.cudaError_t.cudaSuccess and driver:
        info.driver_cuda = _cuda_version(driver)
    err, runtime = rt.cudaRuntimeGetVersion()
    if err == rt.cudaError_t.cudaSuccess:
        info.runtime_cuda = _cuda_version(runtime)
    if reason is not None:
        return
    err, count = rt.cudaGetDeviceCount()
    for i in range(count if err == rt.cudaError_t.cudaSuccess else 0):
        err, prop = rt.cudaGetDeviceProperties(i)
        name = prop.name.decode(errors="replace") if err == rt.cudaError_t.cudaSuccess else "?"
        try:
            bus_id = pci_bus_id(i)
        except CudaError:
            bus_id = "?"
        info.devices.append(Device(i, name.split("\0")[0], bus_id, numa_node_of(bus_id)))


def gather() -> Info:
    """Everything ``info`` prints (blocking: CUDA initializes)."""
    info = Info(backend="host", why="")
    _cuda(info)
    info.versions = {d: _version(d) for d in ("aiopinned", "cuda-bindings", "torch", "cupy",
                                              "cupy-cuda12x", "cupy-cuda13x")}  # fmt: skip
    info.thp, info.thp_defrag = thp_setting("enabled"), thp_setting("defrag")
    info.hugetlb = {page: list(hugetlb_pool(page)) for page in HUGETLB.values()}
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    info.memlock_bytes = None if soft == resource.RLIM_INFINITY else soft
    mem = _meminfo()
    info.mem_total_bytes, info.mem_available_bytes = mem.get("MemTotal"), mem.get("MemAvailable")
    info.touch_threads = default_threads()
    info.warnings = advise(info)
    return info


def advise(info: Info) -> list[str]:
    """What is wrong for pinned memory here, each with its fix."""
    out = []
    bindings = info.versions.get("cuda-bindings")
    if info.driver_cuda is None:
        out.append("no NVIDIA driver: pools use the host backend (no GPU, no pinning)")
    elif bindings and int(info.driver_cuda.split(".")[0]) < int(bindings.split(".")[0]):
        out.append(
            f"driver CUDA {info.driver_cuda} with cuda-bindings {bindings}: install "
            f"'aiopinned[cu{info.driver_cuda.split('.')[0]}]'"
        )
    if info.thp == "never":
        out.append(
            "transparent huge pages are off: pinning by registration touches 4 KiB pages and "
            "runs several times slower (echo madvise > /sys/kernel/mm/transparent_hugepage/enabled)"
        )
    if info.thp in ("always", "madvise") and info.thp_defrag in ("always", "madvise"):
        out.append(
            f"transparent huge page defrag is '{info.thp_defrag}': faults in memory advised "
            "huge pages compact memory first, and where it is fragmented pinning can slow to GB "
            "per minute (pools then fall back to 4 KiB pages: PoolStats.huge_page_fallbacks); "
            "echo defer+madvise > /sys/kernel/mm/transparent_hugepage/defrag, or reserve huge "
            "pages and pass pinning='hugetlb'"
        )
    if info.backend == "cuda" and info.memlock_bytes is not None and info.memlock_bytes < 1 << 30:
        out.append(
            f"RLIMIT_MEMLOCK is {info.memlock_bytes} bytes: registration may be refused past it "
            "(raise 'ulimit -l', or LimitMEMLOCK= in a systemd unit, or pinning='alloc')"
        )
    if info.devices and all(d.numa_node is None for d in info.devices):
        out.append(
            "the system reports no NUMA node for the GPUs (a single-node host, or a VM): "
            "pinned memory is placed wherever the kernel puts it"
        )
    return out


def render(info: Info) -> str:
    gib = 1 << 30

    def size(n: int | None) -> str:
        return "unknown" if n is None else f"{n / gib:.1f} GiB"

    lines = [f"backend (auto): {info.backend} ({info.why})"]
    for d in info.devices:
        node = "none reported" if d.numa_node is None else str(d.numa_node)
        lines.append(f"  cuda:{d.index} {d.name}  pci {d.pci_bus_id}  numa node {node}")
    lines.append(f"CUDA: driver {info.driver_cuda or 'none'}, runtime {info.runtime_cuda or '-'}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in info.versions.items() if v))
    lines.append(f"transparent huge pages: {info.thp or 'unknown'}, "
                 f"defrag {info.thp_defrag or 'unknown'}")  # fmt: skip
    for page, (total, free) in info.hugetlb.items():
        known = "unknown" if total is None else f"{total} set aside, {free} free"
        lines.append(f"reserved huge pages of {page >> 20} MiB (pinning='hugetlb'): {known}")
    memlock = "unlimited" if info.memlock_bytes is None else f"{info.memlock_bytes} bytes"
    lines.append(f"RLIMIT_MEMLOCK: {memlock}")
    lines.append(f"memory: {size(info.mem_total_bytes)} total, "
                 f"{size(info.mem_available_bytes)} available")  # fmt: skip
    lines.append(f"touch threads (pin_threads default): {info.touch_threads}")
    lines += [f"warning: {w}" for w in info.warnings] or ["no warnings"]
    return "\n".join(lines)
