"""FlexLoRA aggregation: the SVD paths of sum_k p_k s_k B_k A_k side by side, and auto's pick.

One module of size N x N (default 4096, LLaMA-7B q/v), random float32 factors,
coefficients ``p_k * alpha / r_k`` with alpha = 16 and data-size weights ``p_k`` (random
example counts), target rank 64. The sweep (``--cases``, default all):

- ``10-clients``: ranks 4,4,8,8,8,16,16,32,32,64 (the original benchmark);
- ``heavy-tail-80``: 80 clients, ranks from {4, 8, 16, 32, 64} drawn with the project's
  heavy-tail distribution (``strategies.ranks``, P(r_i) ~ 1/i^2, FlexLoRA's setting; the
  paper samples about 80 clients a round);
- ``random-80``: 80 clients, ranks uniform on 4..64 (a flat spectrum, no gap at the cut);
- ``rank64-80``: 80 clients all at rank 64, so R = 5120 exceeds N (the factored core is
  as large as the dense matrix).

``--ranks 4,8,...`` runs that single case instead. Paths (``strategies.flexlora_math``):
``factored_svd``, ``randomized_svd``, ``dense_svd`` and ``flexlora_svd`` with
``method="auto"``; all in float64 and including the cast of the inputs (dense: forming M).

- time: median wall time (and process CPU time) over up to ``--repeats`` runs, stopping
  once a path has used ``--budget`` seconds (at least one run); dense runs
  ``--dense-repeats`` times (slow: about N^3 flops);
- peak memory: each path runs in its own fresh subprocess; after the inputs are built
  the process's peak-RSS mark is reset (``/proc/self/clear_refs``) and the reported
  number is the peak resident set size during the runs minus the RSS just before them,
  i.e. every page the path touched on top of its inputs, numpy arrays and LAPACK
  workspace alike (falls back to ``ru_maxrss`` minus that RSS where the reset is
  unavailable, which can only overstate);
- auto: its choice (``choose_svd_method``), its speedup over dense (wall and CPU
  time), and whether it was slower than dense (``auto_never_slower_than_dense`` over
  the sweep; a case where auto picks dense counts as not slower);
- errors against dense, all relative: singular values (max |s - s_dense| / s_dense[0]);
  the rank-r approximation error ``||M - U S Vt||_F`` over the optimal (dense) one,
  minus 1; and the rank-r product ``U S Vt`` against dense's, which is only determined
  where the spectrum has a gap at the cut, so ``max_rel_error`` counts it only where
  ``(sigma_r - sigma_r+1) / sigma_r >= 1e-2`` (the case's ``cut_gap``).

All paths use ONE BLAS thread by default (``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS``
/ ``MKL_NUM_THREADS`` set in the workers): on a machine whose cores are shared with other
work, multi-threaded BLAS stalls erratically (on a busy 2-core box the dense path took
145 s with 2 threads and 34 s with one). ``--threads 0`` keeps numpy's default. The full
sweep takes about 7 minutes of CPU (16 minutes of wall time on a busy 2-core machine),
most of it in the dense SVDs and the factored path at R = 5120; ``--solvers`` about 2.

``--solvers`` instead compares, on one case (default ``random-80``, the flat spectrum),
the ways to get the top-r triplets of the implicit operator: Halko-Martinsson-Tropp
subspace (power) iteration with QR between the products, scipy's ``svds`` (ARPACK,
PROPACK, LOBPCG) on a ``LinearOperator``, and the block Krylov ``randomized_svd``; time
and singular-value error against the factored (exact) SVD.

Usage: python bench/flexlora_svd.py [--json] [--size 4096] [--cases a,b] [--ranks 4,4,8,...]
       python bench/flexlora_svd.py --solvers [--cases random-80]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from strategies.flexlora_math import (
    choose_svd_method,
    dense_svd,
    factored_svd,
    flexlora_svd,
    randomized_svd,
)
from strategies.ranks import distribution_probabilities

DEFAULT_RANKS = "4,4,8,8,8,16,16,32,32,64"
PATHS = {"factored": factored_svd, "randomized": randomized_svd, "dense": dense_svd,
         "auto": flexlora_svd}
CASES = ("10-clients", "heavy-tail-80", "random-80", "rank64-80")
GAP = 1e-2  # relative gap at the cut above which the rank-r product is compared


def case_ranks(name: str, seed: int) -> list[int]:
    """The client ranks of a named case (drawn with ``seed``)."""
    rng = np.random.default_rng(seed)
    if name == "10-clients":
        return [int(r) for r in DEFAULT_RANKS.split(",")]
    if name == "heavy-tail-80":
        choices = [4, 8, 16, 32, 64]
        p = distribution_probabilities("heavy-tail", len(choices))
        return [int(r) for r in rng.choice(choices, size=80, p=p)]
    if name == "random-80":
        return [int(r) for r in rng.integers(4, 65, size=80)]
    if name == "rank64-80":
        return [64] * 80
    raise ValueError(f"unknown case {name!r}; known: {', '.join(CASES)}")


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
    repeats = args.dense_repeats if args.worker == "dense" else args.repeats
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
        before, reset = _rss_kb(), True
    except OSError:
        before, reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    times: list[float] = []
    cpu: list[float] = []
    while len(times) < repeats and (not times or sum(times) < args.budget):
        start, start_cpu = time.perf_counter(), time.process_time()
        u, s, vt = fn(bs, as_, coeffs, args.rank)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = _peak_kb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    choice = choose_svd_method(args.size, args.size, sum(ranks), args.rank)
    np.savez(args.out, u=u, s=s, vt=vt, times=np.array(times), cpu=np.array(cpu),
             peak_mb=np.array((peak - before) / 1024), exact_peak=np.array(reset),
             choice=np.array(choice))


def _stacked(bs: list[np.ndarray], as_: list[np.ndarray], coeffs: list[float]
             ) -> tuple[np.ndarray, np.ndarray]:
    """(U0, V0^T) in float64 with U0 @ V0^T = sum_k c_k B_k A_k."""
    return (np.hstack([c * b.astype(np.float64) for c, b in zip(coeffs, bs, strict=True)]),
            np.vstack([a.astype(np.float64) for a in as_]))


def _subspace_iteration(u0: np.ndarray, v0t: np.ndarray, rank: int, oversample: int,
                        power: int) -> np.ndarray:
    """Halko-Martinsson-Tropp: range of (M M^T)^q M Omega, QR between products."""
    omega = np.random.default_rng(0).standard_normal((v0t.shape[1], rank + oversample))
    q = np.linalg.qr(u0 @ (v0t @ omega))[0]
    for _ in range(power):
        z = np.linalg.qr(v0t.T @ (u0.T @ q))[0]
        q = np.linalg.qr(u0 @ (v0t @ z))[0]
    return np.linalg.svd(v0t.T @ (u0.T @ q), compute_uv=False)[:rank]


def _svds(u0: np.ndarray, v0t: np.ndarray, rank: int, solver: str) -> np.ndarray:
    import warnings

    from scipy.sparse.linalg import LinearOperator, svds

    op = LinearOperator((u0.shape[0], v0t.shape[1]), dtype=np.float64,
                        matvec=lambda x: u0 @ (v0t @ x), rmatvec=lambda y: v0t.T @ (u0.T @ y),
                        matmat=lambda x: u0 @ (v0t @ x), rmatmat=lambda y: v0t.T @ (u0.T @ y))
    with warnings.catch_warnings():  # LOBPCG warns when it stops short of tol
        warnings.simplefilter("ignore", UserWarning)
        s = svds(op, k=rank, solver=solver, tol=1e-8, return_singular_vectors=False,
                 random_state=0)
    return np.sort(s)[::-1]


def _svds_on(bs: list[np.ndarray], as_: list[np.ndarray], coeffs: list[float], rank: int,
             solver: str) -> Callable[[], np.ndarray]:
    return lambda: _svds(*_stacked(bs, as_, coeffs), rank, solver)


def solvers_worker(args: argparse.Namespace) -> None:
    """Time the candidate top-r solvers on one case (in this process); save the table."""
    ranks = [int(r) for r in args.ranks.split(",")]
    bs, as_, coeffs = make_inputs(args.size, ranks, args.alpha, args.seed)
    r = args.rank
    candidates: dict[str, Callable[[], np.ndarray]] = {
        "factored (exact reference)": lambda: factored_svd(bs, as_, coeffs, r)[1],
        "subspace iteration p=16 q=2": lambda: _subspace_iteration(*_stacked(bs, as_, coeffs),
                                                                   r, 16, 2),
        "subspace iteration p=64 q=8": lambda: _subspace_iteration(*_stacked(bs, as_, coeffs),
                                                                   r, 64, 8),
        **{f"svds {s} tol=1e-8": _svds_on(bs, as_, coeffs, r, s)
           for s in ("arpack", "propack", "lobpcg")},
        "block Krylov (randomized_svd)": lambda: randomized_svd(bs, as_, coeffs, r)[1],
    }
    rows, ref = {}, None
    for name, fn in candidates.items():
        start, start_cpu = time.perf_counter(), time.process_time()
        s = fn()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        ref = s if ref is None else ref
        rows[name] = {"wall_s": wall, "cpu_s": cpu,
                      "singular_value_rel_error": float(np.abs(s - ref).max() / ref[0])}
    Path(args.out).write_text(json.dumps(rows))


def run_path(name: str, ranks: str, args: argparse.Namespace, tmp: Path,
             out: Path | None = None) -> dict[str, Any]:
    out = out or tmp / f"{name}.npz"
    cmd = [sys.executable, __file__, "--worker", name, "--out", str(out),
           "--size", str(args.size), "--ranks", ranks, "--rank", str(args.rank),
           "--alpha", str(args.alpha), "--seed", str(args.seed), "--budget", str(args.budget),
           "--repeats", str(args.repeats), "--dense-repeats", str(args.dense_repeats)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if args.threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
    subprocess.run(cmd, check=True, env=env)
    if name == "solvers":
        return {}
    with np.load(out) as z:
        return {"u": z["u"], "s": z["s"], "vt": z["vt"], "times": z["times"].tolist(),
                "cpu": z["cpu"].tolist(), "peak_mb": float(z["peak_mb"]),
                "exact_peak": bool(z["exact_peak"]), "choice": str(z["choice"])}


def dense_update(bs: list[np.ndarray], as_: list[np.ndarray], coeffs: list[float]
                 ) -> np.ndarray:
    """M = sum_k c_k B_k A_k in float64, as one product of the stacked factors."""
    u0 = np.hstack([c * b.astype(np.float64) for c, b in zip(coeffs, bs, strict=True)])
    return u0 @ np.vstack([a.astype(np.float64) for a in as_])


def errors_against(m: np.ndarray, r: dict[str, Any], d: dict[str, Any],
                   block: int = 512) -> tuple[float, float]:
    """(||M - P||_F, ||P - P_dense||_F / ||P_dense||_F) for P = U S Vt, by row blocks."""
    resid2 = diff2 = ref2 = 0.0
    for i in range(0, m.shape[0], block):
        p = (r["u"][i:i + block] * r["s"]) @ r["vt"]
        pd = (d["u"][i:i + block] * d["s"]) @ d["vt"]
        resid2 += float(np.sum((m[i:i + block] - p) ** 2))
        diff2 += float(np.sum((p - pd) ** 2))
        ref2 += float(np.sum(pd ** 2))
    return resid2 ** 0.5, (diff2 / ref2) ** 0.5 if ref2 > 0 else diff2 ** 0.5


def run_case(name: str, ranks: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """All paths on one case, in their own processes; times, memory, errors, auto's pick."""
    text = ",".join(map(str, ranks))
    with tempfile.TemporaryDirectory() as tmp:
        res = {path: run_path(path, text, args, Path(tmp)) for path in PATHS}
    m = dense_update(*make_inputs(args.size, ranks, args.alpha, args.seed))
    sigma = np.linalg.svd(m, compute_uv=False)  # the exact spectrum, for the references
    r, d = args.rank, res["dense"]
    optimal = float(np.sqrt(np.sum(sigma[r:] ** 2)))  # ||M - M_r||_F at its best
    gap = float((sigma[r - 1] - sigma[r]) / sigma[r - 1]) if r < len(sigma) else 1.0
    paths = {}
    for path, out in res.items():
        resid, prod = errors_against(m, out, d)
        s_err = float(np.abs(out["s"] - d["s"]).max() / max(d["s"].max(), 1e-300))
        excess = resid / optimal - 1 if optimal > 0 else resid
        paths[path] = {
            "median_s": statistics.median(out["times"]),
            "cpu_s": statistics.median(out["cpu"]), "times": out["times"],
            "peak_mb": out["peak_mb"], "singular_value_rel_error": s_err,
            "approx_error_excess": excess, "product_rel_error": prod,
            "max_rel_error": max(s_err, abs(excess), prod if gap >= GAP else 0.0),
        }
    del m
    t_dense = paths["dense"]["median_s"]
    auto = paths["auto"]
    return {
        "case": name, "clients": len(ranks), "sum_ranks": sum(ranks), "ranks": ranks,
        "cut_gap": gap, "paths": paths, "auto_choice": res["auto"]["choice"],
        "speedup_vs_dense": t_dense / auto["median_s"],
        "speedup_vs_dense_cpu": paths["dense"]["cpu_s"] / auto["cpu_s"],
        # picking dense itself is never slower than dense (two timings of it differ by noise)
        "auto_not_slower_than_dense": (res["auto"]["choice"] == "dense"
                                       or auto["median_s"] <= t_dense),
        "auto_vs_fastest": auto["median_s"] / min(paths[p]["median_s"] for p in PATHS
                                                  if p != "auto"),
        "max_rel_error": auto["max_rel_error"],
        "peak_mb_is_reset_rss": all(out["exact_peak"] for out in res.values()),
    }


def print_case(c: dict[str, Any]) -> None:
    print(f"\n{c['case']}: {c['clients']} clients, R = {c['sum_ranks']}, "
          f"relative gap at the cut {c['cut_gap']:.2g}")
    print(f"{'path':<11}{'median s':>10}{'cpu s':>9}{'runs':>6}{'peak MB':>9}"
          f"{'sv err':>10}{'approx excess':>15}{'product err':>13}")
    for name, p in c["paths"].items():
        print(f"{name:<11}{p['median_s']:>10.3f}{p['cpu_s']:>9.3f}{len(p['times']):>6}"
              f"{p['peak_mb']:>9.0f}{p['singular_value_rel_error']:>10.1e}"
              f"{p['approx_error_excess']:>15.1e}{p['product_rel_error']:>13.1e}")
    print(f"auto -> {c['auto_choice']}: {c['speedup_vs_dense']:.1f}x faster than dense "
          f"(cpu {c['speedup_vs_dense_cpu']:.1f}x), {c['auto_vs_fastest']:.2f}x the fastest "
          f"path's time, max rel error {c['max_rel_error']:.1e}")


def solvers_main(args: argparse.Namespace) -> None:
    """``--solvers``: the solver comparison on one case, in a worker with the BLAS setting."""
    default = args.cases == ",".join(CASES)  # then the flat spectrum, random-80
    name = "custom" if args.ranks else "random-80" if default else args.cases.split(",")[0]
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else case_ranks(name, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "solvers.json"
        run_path("solvers", ",".join(map(str, ranks)), args, Path(tmp), out=out)
        rows = json.loads(out.read_text())
    print(f"top-{args.rank} solvers on {name} ({len(ranks)} clients, R = {sum(ranks)}), "
          f"{args.size} x {args.size}, BLAS threads {args.threads or 'default'}")
    print(f"{'solver':<32}{'wall s':>9}{'cpu s':>9}{'sv err':>10}")
    for solver, row in rows.items():
        print(f"{solver:<32}{row['wall_s']:>9.2f}{row['cpu_s']:>9.2f}"
              f"{row['singular_value_rel_error']:>10.1e}")
    if args.json:
        print(json.dumps({"case": name, "sum_ranks": sum(ranks), "solvers": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--size", type=int, default=4096, help="module is size x size")
    parser.add_argument("--cases", default=",".join(CASES), help="named cases to run")
    parser.add_argument("--ranks", help="client ranks of a single custom case")
    parser.add_argument("--rank", type=int, default=64, help="target rank of the SVD")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads in the workers (0: numpy's default)")
    parser.add_argument("--repeats", type=int, default=5, help="most runs of a fast path")
    parser.add_argument("--budget", type=float, default=15.0,
                        help="seconds after which a path stops repeating")
    parser.add_argument("--dense-repeats", type=int, default=1, help="runs of the dense path")
    parser.add_argument("--solvers", action="store_true",
                        help="compare top-r solvers on one case instead of the sweep")
    parser.add_argument("--worker", choices=[*sorted(PATHS), "solvers"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "solvers":
        solvers_worker(args)
        return
    if args.worker:
        worker(args)
        return
    if args.solvers:
        solvers_main(args)
        return
    if args.ranks:
        cases = {"custom": [int(r) for r in args.ranks.split(",")]}
    else:
        cases = {name: case_ranks(name, args.seed) for name in args.cases.split(",")}
    print(f"FlexLoRA SVD of a {args.size} x {args.size} module, target rank {args.rank}, "
          f"BLAS threads {args.threads or 'default'}")
    results = []
    for name, ranks in cases.items():
        results.append(run_case(name, ranks, args))
        print_case(results[-1])
    summary: dict[str, Any] = {
        "size": args.size, "rank": args.rank, "threads": args.threads or "default",
        "cases": {c["case"]: c for c in results},
        "auto_never_slower_than_dense": all(c["auto_not_slower_than_dense"] for c in results),
        "max_rel_error": max(c["max_rel_error"] for c in results),
    }
    if "heavy-tail-80" in summary["cases"]:
        summary["heavy_tail_80_speedup_vs_dense"] = (
            summary["cases"]["heavy-tail-80"]["speedup_vs_dense"])
    print(f"\nauto never slower than dense: {summary['auto_never_slower_than_dense']}; "
          f"max rel error of auto {summary['max_rel_error']:.1e}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
