"""Retrieval metrics from a (texts x videos) similarity matrix: R@K, median and mean rank, multiple choice.

Protocol (several captions per video allowed):
- t2v: every caption is a query; its rank is the position of its ground-truth video among all videos.
- v2t: every video is a query; its rank is the position of its best-ranked ground-truth caption among all
  captions (VSE / Collaborative-Experts convention). A video without captions is not a v2t query.

Ties are pessimistic and deterministic: rank = 1 + the number of wrong candidates scoring >= the ground truth
(for v2t: >= the best ground-truth caption's score). A constant-score model therefore gets the worst rank, not
R@1 = 100 % as with "first index wins" (MEE's reference biases ties that way). NaN scores raise ValueError.

R@K are percentages (as in X-Pool / T-MASS / CE); MdR and MnR are 1-based ranks. The matrix is processed in
row blocks of `chunk` so only (chunk x Nv) temporaries exist beside it.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

KS = (1, 5, 10, 50)


def _summary(ranks: torch.Tensor) -> dict[str, float]:
    """R@K (%), median rank and mean rank of 1-based `ranks`."""
    r = ranks.double()
    out = {f"R@{k}": float((r <= k).double().mean() * 100.0) for k in KS}
    out["MdR"] = float(np.median(r.numpy()))  # the usual median: mean of the two middle ranks for an even count
    out["MnR"] = float(r.mean())
    return out


def _check(sim: torch.Tensor, query_item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if sim.ndim != 2:
        raise ValueError(f"retrieval metrics need a (texts, videos) matrix, got shape {tuple(sim.shape)}")
    q = torch.as_tensor(query_item, dtype=torch.long).reshape(-1)
    if q.shape[0] != sim.shape[0]:
        raise ValueError(f"query_item has {q.shape[0]} entries for {sim.shape[0]} text rows")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError("retrieval metrics need at least one text and one video")
    if len(q) and (int(q.min()) < 0 or int(q.max()) >= sim.shape[1]):
        raise ValueError(f"query_item values must lie in 0..{sim.shape[1] - 1}")
    if torch.isnan(sim).any():
        raise ValueError("similarity matrix contains NaN; the model produced invalid scores")
    return sim, q


def t2v_ranks(sim: torch.Tensor, query_item: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    """(Nt,) 1-based rank of each caption's ground-truth video (pessimistic ties)."""
    sim, q = _check(sim, query_item)
    out = torch.empty(sim.shape[0], dtype=torch.long)
    for s in range(0, sim.shape[0], chunk):
        block, gt = sim[s : s + chunk], q[s : s + chunk]
        pos = block.gather(1, gt[:, None])
        out[s : s + chunk] = (block >= pos).sum(1)  # counts the ground truth itself once: rank is 1-based
    return out


def v2t_ranks(sim: torch.Tensor, query_item: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    """(Nq,) 1-based rank of the best ground-truth caption, for each video that has captions (pessimistic ties)."""
    sim, q = _check(sim, query_item)
    videos = torch.unique(q)
    out = torch.empty(len(videos), dtype=torch.long)
    st = sim.t()
    for s in range(0, len(videos), chunk):
        vid = videos[s : s + chunk]
        block = st[vid]  # (c, Nt)
        is_gt = q[None, :] == vid[:, None]
        best = block.masked_fill(~is_gt, float("-inf")).amax(1, keepdim=True)
        out[s : s + chunk] = 1 + ((block >= best) & ~is_gt).sum(1)
    return out


def retrieval_metrics(sim: torch.Tensor, query_item: torch.Tensor, *, chunk: int = 1024) -> dict[str, dict[str, float]]:
    """{"t2v": {R@1, R@5, R@10, R@50, MdR, MnR}, "v2t": {...}} for similarity `sim` (texts x videos).

    Args:
        sim: (Nt, Nv) scores, higher = more similar.
        query_item: (Nt,) index of the ground-truth video of each text row.
        chunk: rows processed at a time.
    """
    sim = sim.detach().float().cpu()
    return {"t2v": _summary(t2v_ranks(sim, query_item, chunk=chunk)),
            "v2t": _summary(v2t_ranks(sim, query_item, chunk=chunk))}


def multiple_choice_accuracy(scores: torch.Tensor, answer: torch.Tensor) -> float:
    """Fraction of questions whose true option scores strictly highest (LSMDC multiple choice; a tie is wrong).

    Args:
        scores: (Q, n_options) score of each option caption against the question's video.
        answer: (Q,) index of the correct option.
    """
    if scores.ndim != 2 or scores.shape[0] != len(answer):
        raise ValueError(f"scores must be (questions, options) matching answer; got {tuple(scores.shape)} "
                         f"and {len(answer)} answers")
    if torch.isnan(scores).any():
        raise ValueError("multiple-choice scores contain NaN")
    a = torch.as_tensor(answer, dtype=torch.long)
    true = scores.gather(1, a[:, None])
    others_ge = ((scores >= true).sum(1) - 1)  # options other than the answer scoring >= it
    return float((others_ge == 0).double().mean()) if len(a) else float("nan")


COLUMNS = (*(f"R@{k}" for k in KS), "MdR", "MnR")  # the printed metrics, in order


def format_table(metrics: Mapping[str, Any]) -> str:
    """Fixed-width table of t2v/v2t metrics (and multiple-choice accuracy when present)."""
    lines = ["dir  " + "".join(f"{k:>9}" for k in COLUMNS)]
    for d in ("t2v", "v2t"):
        if d in metrics:
            lines.append(f"{d:<5}" + "".join(f"{float(metrics[d].get(k, float('nan'))):>9.2f}" for k in COLUMNS))
    if "multiple_choice" in metrics:
        mc = metrics["multiple_choice"]
        lines.append(f"multiple choice accuracy {mc['accuracy']:.4f} ({mc['n_questions']} questions)")
    return "\n".join(lines)


def format_spread(spread: Mapping[str, Any]) -> str:
    """Mean +- std of each metric over the evaluation-noise seeds."""
    lines = [f"over {spread['n']} noise seeds (mean +- std)", "dir  " + "".join(f"{k:>15}" for k in COLUMNS)]
    for d in ("t2v", "v2t"):
        m, sd = spread["mean"][d], spread["std"][d]
        lines.append(f"{d:<5}" + "".join(f"{f'{m[k]:.2f} +- {sd[k]:.2f}':>15}" for k in COLUMNS))
    return "\n".join(lines)
