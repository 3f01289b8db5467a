"""The Ray Serve example on a local Ray instance (where ``ray[serve]`` is installed)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

serve = pytest.importorskip("ray.serve")  # (optional: the test runs where ray is installed)
import httpx  # noqa: E402
import ray  # noqa: E402

from benchmarks import bench_server  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_replicas_answer_correctly_through_rays_http_proxy() -> None:
    sys.path.insert(0, str(EXAMPLES))
    import ray_serve  # the example

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.pathsep.join([str(EXAMPLES), str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        argv = ["--backend", "host", "--max-mib", "0.25", "--dims", "32,48,48,16", "--streams", "2"]
        app = ray_serve.Inference.options(num_replicas=2).bind(argv)
        serve.run(app, route_prefix="/")
        ((body, expected),) = bench_server.make_payloads([32, 48, 48, 16], 0, 64, 1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(8):
                r = client.post("/", content=body)
                bench_server.check_answer(r.raise_for_status().content, expected)
            bad = client.post("/", content=b"\0" * 5)
            assert bad.status_code == 400 and "float32 rows" in bad.text
        serve.shutdown()  # each replica's pools close with it (async __del__)
    finally:
        ray.shutdown()
        sys.path.remove(str(EXAMPLES))
