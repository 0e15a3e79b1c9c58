"""Calibration metrics of predictive probabilities P ∈ [0,1]^{n×C} against labels y (spec blob.md §5.3).

    ACC   = mean_i 1[argmax_c P_ic = y_i]
    ECE   = Σ_b (|S_b|/n) · |acc(S_b) − conf(S_b)|,  conf_i = max_c P_ic, 15 equal-width bins on [0,1]
    NLL   = mean_i −log P_{i,y_i}             (no ε: a zero on the true class is an infinite loss)
    Brier = mean_i Σ_c (P_ic − 1[c = y_i])²   (summed over classes, range [0, 2])

Bins are torchmetrics' ``CalibrationError(task="multiclass", n_bins=15)`` bins: right-open
[k/15, (k+1)/15), with a confidence of exactly 1 in a bin of its own. Everything is returned on its
natural scale (the papers print ACC and ECE ×100).
"""
from __future__ import annotations

from pathlib import Path

import torch

N_BINS = 15


def _as_tensors(probs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.as_tensor(probs, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or len(labels) == 0:
        raise ValueError(f"probabilities must be (n, classes) with n ≥ 1 labels; got {tuple(probs.shape)} "
                         f"and {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}) for {probs.shape[1]} classes")
    return probs, labels


def reliability_bins(probs, labels, n_bins: int = N_BINS) -> dict[str, torch.Tensor]:
    """Per-bin accuracy, mean confidence and count of the top-label predictions (n_bins + 1 bins,
    the last holding confidences of exactly 1)."""
    probs, labels = _as_tensors(probs, labels)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).to(probs.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype)
    index = torch.bucketize(confidence, edges, right=True) - 1
    count = torch.zeros(n_bins + 1, dtype=probs.dtype).scatter_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros_like(count).scatter_add_(0, index, confidence)
    acc_sum = torch.zeros_like(count).scatter_add_(0, index, correct)
    nonempty = count.clamp(min=1)
    return {"accuracy": acc_sum / nonempty, "confidence": conf_sum / nonempty, "count": count, "edges": edges}


def expected_calibration_error(probs, labels, n_bins: int = N_BINS) -> float:
    bins = reliability_bins(probs, labels, n_bins)
    weight = bins["count"] / bins["count"].sum()
    return float((weight * (bins["accuracy"] - bins["confidence"]).abs()).sum())


def negative_log_likelihood(probs, labels) -> float:
    probs, labels = _as_tensors(probs, labels)
    return float(-probs.gather(1, labels[:, None]).log().mean())


def brier_score(probs, labels) -> float:
    probs, labels = _as_tensors(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(dim=1).mean())


def accuracy(probs, labels) -> float:
    probs, labels = _as_tensors(probs, labels)
    return float((probs.argmax(dim=1) == labels).to(probs.dtype).mean())


def calibration_metrics(probs, labels, n_bins: int = N_BINS) -> dict[str, float]:
    """ACC, ECE, NLL and Brier of ``probs`` (n × C) against ``labels`` (n)."""
    return {"acc": accuracy(probs, labels), "ece": expected_calibration_error(probs, labels, n_bins),
            "nll": negative_log_likelihood(probs, labels), "brier": brier_score(probs, labels)}


def reliability_diagram(probs, labels, path: str | Path, title: str = "", n_bins: int = N_BINS) -> Path:
    """Accuracy against confidence per bin (bars) beside the diagonal of perfect calibration, with the
    share of examples per bin underneath; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = reliability_bins(probs, labels, n_bins)
    # The extra bin of confidence exactly 1 is drawn with the last regular one.
    count = bins["count"][:n_bins].clone()
    acc_sum = (bins["accuracy"] * bins["count"])[:n_bins].clone()
    conf_sum = (bins["confidence"] * bins["count"])[:n_bins].clone()
    count[-1] += bins["count"][-1]
    acc_sum[-1] += bins["accuracy"][-1] * bins["count"][-1]
    conf_sum[-1] += bins["confidence"][-1] * bins["count"][-1]
    filled = count > 0
    left = bins["edges"][:-1].numpy()
    width = 1.0 / n_bins
    metrics = calibration_metrics(probs, labels, n_bins)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.bar(left[filled], (acc_sum[filled] / count[filled]).numpy(), width=width, align="edge",
            edgecolor="black", alpha=0.8, label="accuracy")
    top.scatter(left[filled] + width / 2, (conf_sum[filled] / count[filled]).numpy(), color="red", s=12,
                zorder=3, label="mean confidence")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
            title=(title + "\n" if title else "") + "ACC {acc:.3f}  ECE {ece:.3f}  NLL {nll:.3f}  Brier {brier:.3f}"
            .format(**metrics))
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(left, (count / count.sum()).numpy(), width=width, align="edge", edgecolor="black")
    bottom.set(xlabel="confidence (top-label probability)", ylabel="share")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
