"""PNG figures of evaluation results (matplotlib, headless)."""

from typing import Dict, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def depth_bar_chart(by_depth: dict, title: str, path: str, chance: Optional[float] = None) -> str:
    """Accuracy per depth bucket with what it takes to read it honestly: the 95% Wilson interval of each
    bucket, its number of queries, and the chance level (``chance``) as a dashed line."""
    fig, ax = plt.subplots(figsize=(5.2, 3.9))
    draw_depth_accuracy(ax, by_depth, chance)
    ax.set_title(title, fontsize=8)
    return _save(fig, path)


def accuracy_and_routing_chart(
    by_depth: dict, routing: Dict[str, dict], title: str, path: str, chance: Optional[float] = None
) -> str:
    """Two panels side by side: accuracy by depth (as depth_bar_chart) and, per retrieval layer, routing
    recall by depth: the share of answers beyond the local two chunks whose chunk the routing picked, next to
    what uniformly random routing would pick (hydralm/eval/routing_recall.py)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.1))
    draw_depth_accuracy(left, by_depth, chance)
    labels = list(by_depth)
    width = 0.8 / max(1, len(routing))
    for j, (layer, summary) in enumerate(routing.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(labels))]
        buckets = [summary["by_depth"][b] for b in labels]
        values = [b["recall_far"] if b["recall_far"] is not None else 0.0 for b in buckets]
        right.bar(xs, values, width, label=f"{layer} routing", color=f"C{j}")
        right.scatter(xs, [b["chance_far"] or 0.0 for b in buckets], marker="_", s=200, color="black", zorder=3)
        for x, b in zip(xs, buckets):
            text = "n=0" if b["recall_far"] is None else f"{b['recall_far']:.2f}\nn={b['far_queries']}"
            right.text(x, 1.02, text, ha="center", va="bottom", fontsize=6)
    right.scatter([], [], marker="_", s=200, color="black", label="random routing")
    _depth_axes(right, labels, "routing recall (far answers)", len(routing) + 1)
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def draw_depth_accuracy(ax, by_depth: dict, chance: Optional[float] = None) -> None:
    labels = list(by_depth)
    values = [by_depth[b]["accuracy"] for b in labels]
    heights = [v if v is not None else 0.0 for v in values]
    ax.bar(labels, heights, color="#4C72B0", label="accuracy")
    if all("ci95" in by_depth[b] for b in labels):
        lows = [
            max(0.0, h - by_depth[b]["ci95"][0]) if v is not None else 0.0 for b, v, h in zip(labels, values, heights)
        ]
        highs = [
            max(0.0, by_depth[b]["ci95"][1] - h) if v is not None else 0.0 for b, v, h in zip(labels, values, heights)
        ]
        ax.errorbar(
            range(len(labels)),
            heights,
            yerr=[lows, highs],
            fmt="none",
            color="black",
            capsize=3,
            label="95% Wilson interval",
        )
    if chance is not None:
        ax.axhline(chance, color="#C44E52", linestyle="--", linewidth=1, label=f"chance {chance:.1%}")
    for i, (b, v) in enumerate(zip(labels, values)):
        text = "no queries" if v is None else f"{v:.2f}\nn={by_depth[b]['queries']}"
        ax.text(i, 1.02, text, ha="center", va="bottom", fontsize=7)
    _depth_axes(ax, labels, "answer accuracy", 3)


def _depth_axes(ax, labels: list, ylabel: str, legend_columns: int) -> None:
    """The depth buckets along x, a 0-1 scale with room for the bars' labels, the legend below."""
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 1.2)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xlabel("depth of the fact in the context (%)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=legend_columns, frameon=False)


def models_by_depth_chart(models: Dict[str, dict], title: str, path: str, chance: Optional[float] = None) -> str:
    """Several models' answer accuracy by depth bucket, side by side: models[name] = {"accuracy": overall,
    "by_depth": {bucket: accuracy or None}} (C10's comparison at equal budget)."""
    labels = list(next(iter(models.values()))["by_depth"])
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    width = 0.8 / len(models)
    for j, (name, model) in enumerate(models.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(labels))]
        values = [model["by_depth"][b] for b in labels]
        ax.bar(xs, [v or 0.0 for v in values], width, color=f"C{j}", label=f"{name} ({model['accuracy']:.1%})")
        for x, v in zip(xs, values):
            ax.text(x, (v or 0.0) + 0.02, "n/a" if v is None else f"{v:.2f}", ha="center", va="bottom", fontsize=6)
    if chance is not None:
        ax.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance {chance:.1%}")
    _depth_axes(ax, labels, "answer accuracy", len(models) + 1)
    ax.set_title(title, fontsize=8)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def needle_heatmap(lengths: list, depths: list, grid: list, title: str, path: str) -> str:
    """grid[i][j] = accuracy at depths[i], lengths[j]."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1 + 0.5 * len(depths)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_plot(xs: list, ys: list, xlabel: str, ylabel: str, title: str, path: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs, ys, marker="o")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
