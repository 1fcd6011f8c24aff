"""Data-parallel training on mx.distributed: 2 ranks on the ring backend over loopback (CPU) must give the same
losses and adapter as one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np

from train_helpers import build_data_folder, build_model_folder

from smoa_mlx.train import run

# The rank scripts import this checkout's smoa_mlx, installed or not.
REPO = str(Path(__file__).resolve().parent.parent)
PYTHONPATH = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_ring_ranks_equal_one_process(tmp_path):
    model = build_model_folder(tmp_path / "model")
    data = build_data_folder(tmp_path / "data", n_train=16, n_valid=8)  # equal-length examples
    opts = dict(model=str(model), data=str(data), iters=4, batch_size=4, steps_per_report=1, steps_per_eval=2,
                save_every=2, val_batches=-1, learning_rate=0.5, warmup=0, dropout=0.0, seed=1,
                optimizer="sgd")  # SGD, not Adam: Adam is blind to a sum-instead-of-mean gradient bug

    single = run(opts, adapter_path=str(tmp_path / "single"))

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(2)]))
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import mlx.core as mx
        from smoa_mlx.train import run
        world = mx.distributed.init()
        assert world.size() == 2, world.size()
        result = run({opts!r}, adapter_path={str(tmp_path / 'ring')!r})
        if world.rank() == 0:
            with open({str(tmp_path / 'ring.json')!r}, "w") as f:
                json.dump(result, f)
    """))
    procs = [
        subprocess.Popen([sys.executable, str(script)], env={**os.environ, "MLX_RANK": str(r),
                         "MLX_HOSTFILE": str(hostfile), "PYTHONPATH": PYTHONPATH},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]

    ring = json.loads((tmp_path / "ring.json").read_text())
    assert ring["world_size"] == 2 and single["world_size"] == 1
    for key in ("train_losses", "val_losses"):
        got, want = np.array(ring[key]), np.array(single[key])
        np.testing.assert_array_equal(got[:, 0], want[:, 0])
        np.testing.assert_allclose(got[:, 1], want[:, 1], rtol=2e-5, err_msg=key)
    a = mx.load(str(tmp_path / "single" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "ring" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    assert max(float(mx.abs(v).max()) for k, v in a.items() if ".smoa_b." in k) > 0
