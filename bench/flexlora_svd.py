"""FlexLoRA aggregation: factored SVD vs dense SVD of sum_k p_k s_k B_k A_k, side by side.

One module of size N x N (default 4096, LLaMA-7B q/v) and one client per entry of
``--ranks`` (default 10 clients, ranks 4,4,8,8,8,16,16,32,32,64), random float32
factors, coefficients ``p_k * alpha / r_k`` with alpha = 16 and data-size weights
``p_k`` (random example counts), target rank 64. Each path is
``strategies.flexlora_math.factored_svd`` / ``dense_svd`` (both in float64, both
including the cast of the inputs; the dense one includes forming M).

- time: median wall time over ``--repeats`` runs (factored) and ``--dense-repeats``
  runs (dense, slow: about N^3 flops);
- peak memory: each path runs in its own fresh subprocess; after the inputs are built
  the process's peak-RSS mark is reset (``/proc/self/clear_refs``) and the reported
  number is the peak resident set size during the runs minus the RSS just before them,
  i.e. every page the path touched on top of its inputs, numpy arrays and LAPACK
  workspace alike (falls back to ``ru_maxrss`` minus that RSS where the reset is
  unavailable, which can only overstate);
- error: relative Frobenius error of the rank-``--rank`` products U_r S_r Vt_r between
  the two paths and the max singular-value error relative to the largest one;
  ``max_rel_error`` is the larger of the two.

Both paths use ONE BLAS thread by default (``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS``
/ ``MKL_NUM_THREADS`` set in the workers): on a machine whose cores are shared with other
work, multi-threaded BLAS stalls erratically (on a busy 2-core box the dense path took
145 s with 2 threads and 34 s with one). ``--threads 0`` keeps numpy's default. The whole
default run takes under a minute, almost all of it in the dense SVD.

Usage: python bench/flexlora_svd.py [--json] [--size 4096] [--ranks 4,4,8,...] [--rank 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from strategies.flexlora_math import dense_svd, factored_svd

DEFAULT_RANKS = "4,4,8,8,8,16,16,32,32,64"
PATHS = {"factored": factored_svd, "dense": dense_svd}


def make_inputs(size: int, ranks: list[int], alpha: float, seed: int
                ) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    bs = [rng.standard_normal((size, r), dtype=np.float32) for r in ranks]
    as_ = [rng.standard_normal((r, size), dtype=np.float32) for r in ranks]
    counts = rng.integers(100, 1000, size=len(ranks)).astype(np.float64)
    p = counts / counts.sum()
    return bs, as_, [float(pk * alpha / r) for pk, r in zip(p, ranks, strict=True)]


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError("no VmRSS")


def _peak_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise OSError("no VmHWM")


def worker(args: argparse.Namespace) -> None:
    """Run one path in this (fresh) process; save times, peak memory and the SVD."""
    ranks = [int(r) for r in args.ranks.split(",")]
    bs, as_, coeffs = make_inputs(args.size, ranks, args.alpha, args.seed)
    fn = PATHS[args.worker]
    repeats = args.repeats if args.worker == "factored" else args.dense_repeats
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
        before, reset = _rss_kb(), True
    except OSError:
        before, reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        u, s, vt = fn(bs, as_, coeffs, args.rank)
        times.append(time.perf_counter() - start)
    peak = _peak_kb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.savez(args.out, u=u, s=s, vt=vt, times=np.array(times),
             peak_mb=np.array((peak - before) / 1024), exact_peak=np.array(reset))


def run_path(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    out = tmp / f"{name}.npz"
    cmd = [sys.executable, __file__, "--worker", name, "--out", str(out),
           "--size", str(args.size), "--ranks", args.ranks, "--rank", str(args.rank),
           "--alpha", str(args.alpha), "--seed", str(args.seed),
           "--repeats", str(args.repeats), "--dense-repeats", str(args.dense_repeats)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if args.threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
    subprocess.run(cmd, check=True, env=env)
    with np.load(out) as z:
        return {"u": z["u"], "s": z["s"], "vt": z["vt"], "times": z["times"].tolist(),
                "peak_mb": float(z["peak_mb"]), "exact_peak": bool(z["exact_peak"])}


def product_rel_error(f: dict[str, object], d: dict[str, object], block: int = 512) -> float:
    """||U_f S_f Vt_f - U_d S_d Vt_d||_F / ||U_d S_d Vt_d||_F, formed a block of rows at a time."""
    diff2 = ref2 = 0.0
    for i in range(0, f["u"].shape[0], block):
        pf = (f["u"][i:i + block] * f["s"]) @ f["vt"]
        pd = (d["u"][i:i + block] * d["s"]) @ d["vt"]
        diff2 += float(np.sum((pf - pd) ** 2))
        ref2 += float(np.sum(pd ** 2))
    return (diff2 / ref2) ** 0.5 if ref2 > 0 else diff2 ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--size", type=int, default=4096, help="module is size x size")
    parser.add_argument("--ranks", default=DEFAULT_RANKS, help="client ranks, comma-separated")
    parser.add_argument("--rank", type=int, default=64, help="target rank of the SVD")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads in the workers (0: numpy's default)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of the factored path")
    parser.add_argument("--dense-repeats", type=int, default=1, help="runs of the dense path")
    parser.add_argument("--worker", choices=sorted(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        res = {name: run_path(name, args, Path(tmp)) for name in PATHS}
    f, d = res["factored"], res["dense"]
    t_f, t_d = statistics.median(f["times"]), statistics.median(d["times"])
    prod_err = product_rel_error(f, d)
    s_err = float(np.abs(f["s"] - d["s"]).max() / max(d["s"].max(), 1e-300))
    summary = {
        "size": args.size, "clients": len(ranks), "ranks": ranks, "sum_ranks": sum(ranks),
        "rank": args.rank, "threads": args.threads or "default",
        "factored_s": t_f, "dense_s": t_d,
        "factored_times": f["times"], "dense_times": d["times"], "speedup": t_d / t_f,
        "product_rel_error": prod_err, "singular_value_rel_error": s_err,
        "max_rel_error": max(prod_err, s_err),
        "factored_peak_mb": f["peak_mb"], "dense_peak_mb": d["peak_mb"],
        "peak_mb_is_reset_rss": f["exact_peak"] and d["exact_peak"],
    }
    print(f"FlexLoRA SVD of a {args.size} x {args.size} module, {len(ranks)} clients, "
          f"ranks {args.ranks} (sum {sum(ranks)}), target rank {args.rank}, "
          f"BLAS threads {args.threads or 'default'}")
    print(f"{'path':<10}{'median s':>11}{'runs':>6}{'peak MB':>10}")
    for name, r in res.items():
        print(f"{name:<10}{statistics.median(r['times']):>11.4f}{len(r['times']):>6}"
              f"{r['peak_mb']:>10.1f}")
    print(f"speedup {summary['speedup']:.1f}x   product rel error {prod_err:.2e}   "
          f"singular value rel error {s_err:.2e}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
