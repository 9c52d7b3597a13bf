"""`phi4mm serve --replicas N`: the OpenAI-compatible server as N Ray Serve replicas behind one HTTP port.

Each replica is the single-process server of `serve.app.create_app` (its own model, engine and continuous
batching) built inside a Ray actor, plus `GET /replica` (which process, host and GPU answered); Ray Serve's
proxy spreads requests over the replicas and streams SSE responses through. Scaling, placement on nodes and
restarts of a dead replica are Ray's: phi4mm adds no cluster layer. On several machines, start the cluster with
`ray start` and pass its address; every node must see the model directory at the same path.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from phi4mm.tasks.cluster import connect

READY_TIMEOUT_S = 600.0  # loading the full model and capturing CUDA graphs takes ~1 minute per replica
REPLICA_ROUTE = "/replica"  # GET: the answering replica's process, host, GPU and load time (replica_info)


class Replica:
    """One server: Ray Serve builds it in its actor, then calls `__serve_build_asgi_app__` (the model loads
    there, not in the driver). A module-level class, so workers import it rather than unpickle a copy."""

    def __init__(self, model_dir: str, load: dict[str, Any], app: dict[str, Any]):
        self.model_dir, self.load, self.app_kwargs = model_dir, load, app

    def __serve_build_asgi_app__(self):
        import phi4mm
        from phi4mm.engine.engine import Engine
        from phi4mm.serve.app import create_app
        load_started = time.time()
        model = phi4mm.load(self.model_dir, **self.load)
        kw = dict(self.app_kwargs)
        engine = Engine(model, num_blocks=kw.pop("num_blocks"), max_batch=kw.pop("max_batch"),
                        max_waiting=kw.pop("max_waiting"), merge_adapter=kw.pop("merge_adapter"))
        if model.device.type == "cuda":
            engine.warmup()  # compile and capture before the replica reports ready
        app = create_app(model, engine, **kw)
        info = replica_info(model.device, load_started, time.time() - load_started)
        # Which process, host and GPU answered: placement checked from inside the replica, not assumed.
        app.add_api_route(REPLICA_ROUTE, lambda: info, methods=["GET"])
        return app


def replica_info(device: Any, load_started: float, load_seconds: float) -> dict[str, Any]:
    """What this replica runs on, as seen from inside its process: `GET /replica` answers it (the Ray proxy
    picks the replica, so repeated calls reach each of them). load_started is a Unix time, so replicas'
    loading windows can be compared (loaded at once or one after the other)."""
    import os
    import socket

    import ray
    import torch
    from ray import serve
    gpu = uuid = None
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu, uuid = props.name, str(props.uuid)
    return {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
            "hostname": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "ray_gpu_ids": ray.get_gpu_ids(),
            "device": str(device), "gpu": gpu, "gpu_uuid": uuid, "ray_version": ray.__version__,
            "load_started": load_started, "load_seconds": round(load_seconds, 3)}


def start(model_dir: str | Path, replicas: int = 2, *, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
          host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", dtype: str | None = None,
          api_key: str | None = None, max_batch: int = 64, max_waiting: int = 1024, num_blocks: int | None = None,
          allow_remote_media: bool = False, allow_local_files: bool = False, merge_adapter: str | None = None,
          model_name: str | None = None, ray_address: str | None = None, app_name: str = "phi4mm",
          options: Any = None) -> str:
    """Deploy `replicas` servers of `model_dir` on Ray Serve at http://host:port and return that URL once every
    replica has loaded. `serve.shutdown()` (or `stop()`) takes them down."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1; got {replicas}")
    _, _, device = connect(ray_address, "serving replicas", device, gpus_per_replica)
    from ray import serve
    model_dir = str(Path(model_dir).resolve())
    serve.start(http_options={"host": host, "port": port})
    if num_blocks is None:
        from phi4mm.engine.engine import cpu_kv_blocks
        num_blocks = cpu_kv_blocks(device)
    app_kwargs = dict(model_name=model_name or Path(model_dir).name, api_key=api_key, num_blocks=num_blocks,
                      max_batch=max_batch, max_waiting=max_waiting, allow_remote_media=allow_remote_media,
                      allow_local_files=allow_local_files, merge_adapter=merge_adapter, options=options)
    deployment = serve.deployment(serve.ingress()(Replica), name="phi4mm", num_replicas=replicas,
                                  max_ongoing_requests=max_batch + max_waiting,
                                  ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica})
    serve.run(deployment.bind(model_dir, {"device": device, "dtype": dtype}, app_kwargs), name=app_name,
              route_prefix="/", blocking=False)
    _wait_running(app_name)
    return f"http://{host}:{port}"


def _wait_running(app_name: str) -> None:
    from ray import serve
    t0 = time.monotonic()
    while time.monotonic() - t0 < READY_TIMEOUT_S:
        st = serve.status().applications.get(app_name)
        state = str(getattr(st, "status", ""))
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED"):
            raise RuntimeError(f"the replicas failed to start: {st.message}")
        time.sleep(0.5)
    raise RuntimeError(f"the replicas were not ready after {READY_TIMEOUT_S:.0f} s")


def stop() -> None:
    import ray
    from ray import serve
    serve.shutdown()
    ray.shutdown()


def serve_forever(model_dir: str | Path, replicas: int, **kw: Any) -> None:
    """`phi4mm serve --replicas N`: deploy, print the URL, and keep serving until interrupted."""
    url = start(model_dir, replicas, **kw)
    print(f"serving {replicas} replicas at {url} (Ray Serve); Ctrl-C stops them", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        stop()
