"""How far an aggregate of LoRA factors is from the average of the clients' updates.

FedIT averages A and B separately; the update it applies, ``s avg(B) avg(A)``, is not
the average update ``sum_k w_k s_k B_k A_k``. This module measures the relative error
per module without forming any d x k matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.adapter import LoraAdapter


def sum_of_products_norm(
    Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], coeffs: Sequence[float]
) -> float:
    """``||sum_k c_k B_k A_k||_F`` from the stacked factors, without the d x k matrix.

    With ``U = [c_1 B_1, ..., c_n B_n]`` and ``V = [A_1; ...; A_n]`` the sum is ``U V``;
    QR both (``U = Q_u R_u``, ``V^T = Q_v R_v``) and ``||U V||_F = ||R_u R_v^T||_F``.
    O((d + k) R^2) for total rank R, and stable when the sum nearly cancels (a Gram-matrix
    formula would lose half the digits there).
    """
    U = np.concatenate([c * b.astype(np.float64) for b, c in zip(Bs, coeffs, strict=True)], 1)
    V = np.concatenate([a.astype(np.float64) for a in As], axis=0)
    r_u = np.linalg.qr(U, mode="r")
    r_v = np.linalg.qr(V.T, mode="r")
    return float(np.linalg.norm(r_u @ r_v.T))


def aggregation_error(
    aggregate: LoraAdapter, adapters: Sequence[LoraAdapter], weights: np.ndarray
) -> dict[str, float]:
    """Per module: ``||s B A - sum_k w_k s_k B_k A_k||_F / ||sum_k w_k s_k B_k A_k||_F``.

    ``aggregate`` is the server's new adapter, ``adapters`` the clients', ``weights``
    their normalised aggregation weights. A module whose average update is zero reports
    0 when the aggregate is zero too, and ``inf`` otherwise.
    """
    errors: dict[str, float] = {}
    for name, factors in aggregate.modules.items():
        Bs = [a.modules[name].B for a in adapters]
        As = [a.modules[name].A for a in adapters]
        coeffs = [float(w) * a.scale(name) for w, a in zip(weights, adapters, strict=True)]
        reference = sum_of_products_norm(Bs, As, coeffs)
        difference = sum_of_products_norm(
            [factors.B, *Bs], [factors.A, *As], [aggregate.scale(name), *(-c for c in coeffs)]
        )
        if reference == 0.0:
            errors[name] = 0.0 if difference == 0.0 else float("inf")
        else:
            errors[name] = difference / reference
    return errors
