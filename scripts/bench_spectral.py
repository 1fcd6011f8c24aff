"""Time the spectral ordering: smoa_mlx's Gram eigendecomposition against full SVDs, side by side in one run.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python scripts/bench_spectral.py --out benchmarks/spectral.json

For each shape it times (once each, same process, same random matrix):
  gram        smoa_mlx.spectral_order (float64 Gram + eigh + one product), what the package uses
  svd_f64     smoa_mlx.spectral_order(method="svd"): the full-SVD path kept for checks (float64)
  numpy_svd   numpy.linalg.svd(float32, full_matrices=False): the reference's computation on the CPU
  mlx_svd     mlx.core.linalg.svd(float32) on the CPU stream (MLX has no GPU SVD); skip with --no-mlx-svd
and checks that the Gram ordering equals the ordering from the float32 SVD scores up to near-ties.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from smoa_mlx.spectral import _scores_from_energy, spectral_order


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _orders_from_svd(u, s, vh):
    s2 = (s.astype(np.float64) ** 2)[None, :]
    u = u.astype(np.float64)
    v = vh.T.astype(np.float64)
    return np.argsort(_scores_from_energy(u * u * s2), kind="stable"), np.argsort(
        _scores_from_energy(v * v * s2), kind="stable"
    )


def _mlx_svd(w):
    import mlx.core as mx

    u, s, vh = mx.linalg.svd(mx.array(w), compute_uv=True, stream=mx.cpu)
    mx.eval(u, s, vh)
    # MLX returns full U / Vh; the economy part is what the scores use.
    q = min(w.shape)
    return np.array(u)[:, :q], np.array(s), np.array(vh)[:q]


def bench(shape, run_mlx: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    result = {"shape": list(shape)}
    (rows, cols), result["gram_s"] = _timed(lambda: spectral_order(w))
    (check_rows, check_cols), result["svd_f64_path_s"] = _timed(lambda: spectral_order(w, method="svd"))
    result["gram_equals_svd_f64_path"] = bool((rows == check_rows).all() and (cols == check_cols).all())
    result["speedup_vs_svd_f64_path"] = result["svd_f64_path_s"] / result["gram_s"]
    (u, s, vh), result["numpy_svd_f32_s"] = _timed(lambda: np.linalg.svd(w, full_matrices=False))
    svd_rows, svd_cols = _orders_from_svd(u, s, vh)
    # float32 SVD scores carry ~1e-6 relative noise, so neighbours with closer scores may swap places.
    result["row_positions_differing_from_f32_svd"] = int((rows != svd_rows).sum())
    result["col_positions_differing_from_f32_svd"] = int((cols != svd_cols).sum())
    result["speedup_vs_numpy_svd"] = result["numpy_svd_f32_s"] / result["gram_s"]
    if run_mlx:
        _, result["mlx_svd_f32_s"] = _timed(lambda: _mlx_svd(w))
        result["speedup_vs_mlx_svd"] = result["mlx_svd_f32_s"] / result["gram_s"]
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,4096x14336", help="comma-separated d_out x d_in")
    parser.add_argument("--no-mlx-svd", action="store_true", help="skip MLX's (slow) CPU SVD")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    report = {
        "command": "python scripts/bench_spectral.py " + " ".join(argv or []),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "numpy": np.__version__,
        "results": [],
    }
    print(f"{'shape':>12} {'gram s':>8} {'f64 svd s':>10} {'numpy svd s':>12} {'mlx svd s':>10} {'x numpy':>8} {'x mlx':>7}")
    for shape in shapes:
        r = bench(shape, not args.no_mlx_svd)
        report["results"].append(r)
        print(
            f"{shape[0]}x{shape[1]:>6} {r['gram_s']:8.2f} {r['svd_f64_path_s']:10.2f} {r['numpy_svd_f32_s']:12.2f} "
            f"{r.get('mlx_svd_f32_s', float('nan')):10.2f} {r['speedup_vs_numpy_svd']:8.2f} "
            f"{r.get('speedup_vs_mlx_svd', float('nan')):7.2f}",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
