"""PNG plots of a run's history (loss and validation R@k per epoch), matplotlib Agg backend."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot import
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write `loss.png` and `recall.png` from metrics.jsonl records; returns the written paths."""
    out_dir = Path(out_dir)
    epochs = [h["epoch"] for h in history]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for direction, style in (("t2v", "-"), ("v2t", "--")):
        for k in ("R@1", "R@5", "R@10"):
            ys = [h.get("val", {}).get(direction, {}).get(k) for h in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, ys, style, marker="o", label=f"val {direction} {k}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("recall (%)")
    ax.set_title("validation recall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "recall.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
