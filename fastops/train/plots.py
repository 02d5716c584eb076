"""PNG plots with matplotlib's Agg canvas (no display needed, and pyplot's global backend is left
alone). The loss curves are shared; each training draws its own task plot with figure()."""

from fastops.train.common import require

BACKEND_STYLE = {"fastops": "-", "torch": "--"}


def figure(width, height):
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path):
    fig.savefig(path, dpi=100, bbox_inches="tight")


def loss_curves(path, runs, title, curve="loss", group=None, color=None, ylabel="training loss",
                logy=True):
    """One line per run: solid for fastops and dashed for torch (on top of each other when the
    backends agree). group(run) -> panel title splits the runs into panels; color(run) -> key
    of the line's colour (default: the variant)."""
    from matplotlib.ticker import MaxNLocator

    groups = {}
    for r in runs:
        groups.setdefault(group(r) if group else "", []).append(r)
    fig = figure(6 * len(groups), 4)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    colors = {}
    for ax, (name, members) in zip(axes, groups.items()):
        for r in members:
            values = r.history.get(curve, [])
            if not values:
                continue
            key = color(r) if color else r.variant
            line_color = colors.setdefault(key, f"C{len(colors) % 10}")
            ax.plot(range(1, len(values) + 1), values, BACKEND_STYLE.get(r.backend, "-"),
                    color=line_color, label=f"{r.variant} ({r.backend})", linewidth=1.3)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {name}" if name else title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    save(fig, path)
