"""PNG figures of evaluation results (matplotlib, headless)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def depth_bar_chart(by_depth: dict, title: str, path: str) -> str:
    labels = list(by_depth)
    values = [by_depth[b]["accuracy"] or 0.0 for b in labels]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(labels, values, color="#4C72B0")
    ax.set_ylim(0, 1)
    ax.set_xlabel("depth of the fact in the context (%)")
    ax.set_ylabel("answer accuracy")
    ax.set_title(title, fontsize=9)
    for i, v in enumerate(values):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
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
