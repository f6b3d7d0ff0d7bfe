"""Figures of a routing report: the per-layer heatmap grid, the layer-averaged heatmap, the group-mass bars.

Heatmaps use a diverging scale centred on uniform routing (1/N, white): the deviations are the story, not the
level. matplotlib (the ``plots`` extra) is imported only here, when drawing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loramoe.files import atomic_path


def draw_routing(report: Mapping[str, Any], out_dir: Path, *, prefix: str = "routing") -> dict[str, str]:
    """Draw ``{prefix}_layers.png``, ``{prefix}_mean.png`` and ``{prefix}_groups.png`` into ``out_dir``.

    Returns:
        Figure kind (``layers``, ``mean``, ``groups``) -> its path.

    Raises:
        ImportError: matplotlib is missing (names the ``loramoe[plots]`` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "routing plots need matplotlib: pip install 'loramoe[plots]' (or plot=False)"
        ) from e
    plot = _RoutingPlots(report, Figure)
    files = {}
    for kind, fig in (("layers", plot.layers()), ("mean", plot.mean()), ("groups", plot.groups())):
        FigureCanvasAgg(fig)
        path = out_dir / f"{prefix}_{kind}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        files[kind] = str(path)
    return files


class _RoutingPlots:
    """The three figures of one report, sharing its task labels and colour scale."""

    def __init__(self, report: Mapping[str, Any], figure: type) -> None:
        self.report, self.Figure = report, figure
        self.tasks = list(report["tasks"])
        self.labels = [f"{t} ({report['tasks'][t]['task_type'][:4]})" for t in self.tasks]
        self.n, self.group_of_expert = report["num_experts"], report["group_of_expert"]
        tasks = report["tasks"].values()
        every = [p for t in tasks for p in [*t["mean"], *sum(t["per_layer"].values(), [])]]
        self.spread = max(1e-6, max(abs(p - 1.0 / self.n) for p in every))

    def heat(self, ax: Any, matrix: torch.Tensor, title: str, *, ticks: bool) -> Any:
        n = self.n
        image = ax.imshow(
            matrix.numpy(),
            aspect="auto",
            cmap="RdBu_r",
            vmin=1.0 / n - self.spread,
            vmax=1.0 / n + self.spread,
        )
        ax.set_title(title, fontsize=8)
        names = self.report["task_names"]
        xticks = (
            [f"{e}\n{names[self.group_of_expert[e]][:4]}" for e in range(n)]
            if ticks
            else [str(e) for e in range(n)]
        )
        ax.set_xticks(range(n), xticks, fontsize=6)
        ax.set_yticks(range(len(self.tasks)), self.labels if ticks else [""] * len(self.tasks), fontsize=7)
        first_group = sum(g == 0 for g in self.group_of_expert)
        ax.axvline(first_group - 0.5, color="black", lw=1)  # the boundary after the first group
        return image

    def layers(self) -> Any:
        """One heatmap (tasks x experts) per layer, in a grid of up to six columns."""
        layers, rows_of = self.report["layers"], self.report["tasks"]
        cols = min(6, len(layers))
        rows = -(-len(layers) // cols)
        height = 0.25 * len(self.tasks) * rows + 1.4 * rows + 0.6
        fig = self.Figure(figsize=(2.3 * cols + 2, height), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k >= len(layers):
                ax.set_visible(False)
                continue
            m = torch.tensor([rows_of[t]["per_layer"][str(layers[k])] for t in self.tasks])  # (tasks, N)
            image = self.heat(ax, m, f"layer {layers[k]}", ticks=k % cols == 0)
        fig.colorbar(image, ax=axes, shrink=0.6, label=f"mean router probability (white: uniform 1/{self.n})")
        fig.suptitle("Router probability per task (rows) and expert (columns), by layer")
        return fig

    def mean(self) -> Any:
        """The heatmap averaged over layers."""
        fig = self.Figure(
            figsize=(1.0 + 0.55 * self.n + 2.0, 0.45 * len(self.tasks) + 1.6), layout="constrained"
        )
        ax = fig.add_subplot()
        matrix = torch.tensor([self.report["tasks"][t]["mean"] for t in self.tasks])
        image = self.heat(ax, matrix, "mean over layers", ticks=True)
        fig.colorbar(image, ax=ax, label=f"mean router probability (white: 1/{self.n})")
        return fig

    def groups(self) -> Any:
        """Bars: each task's router mass on each expert group; the dashed line is an even split."""
        fig = self.Figure(figsize=(max(4.0, 0.9 * len(self.tasks) + 2.5), 3.6), layout="constrained")
        ax = fig.add_subplot()
        names = list(self.report["task_names"])
        width = 0.8 / len(names)
        for g, group in enumerate(names):
            xs = [i + (g - (len(names) - 1) / 2) * width for i in range(len(self.tasks))]
            masses = [self.report["tasks"][t]["group_mass"][group] for t in self.tasks]
            ax.bar(xs, masses, width=width, label=f"{group} experts")
        ax.axhline(1.0 / len(names), color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(self.tasks)), self.labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("router mass")
        ax.set_ylim(0, 1)
        ax.set_title("Router mass on each expert group")
        ax.legend(fontsize="small")
        return fig
