"""The PNG figure of ``nostall bench``: throughput and a timeline of batch arrivals.

``plot_bench(records, path)`` takes the run records of a bench (plain dicts, as in
the bench JSON) and writes one PNG with two panels:

* left: samples/s against ``num_workers``, one line per loader x persistence x
  start method (the 0-worker run of a loader starts each of its lines);
* right: when each batch arrived, one row per selected run, with the pauses
  between epochs shaded and labelled with their length.

matplotlib is an optional dependency (``pip install 'nostall[plot]'``); it is
imported only when a figure is drawn, so ``import nostall`` never needs it.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_bench"]

# One colour per loader family; persistence is the line style, the start method the marker.
_LOADER_COLORS = {"torch": "#e8541e", "nostall": "#1f5fa8"}
_OTHER_COLOR = "#555555"
_LINESTYLES = {True: "-", False: "--", None: ":"}
_MARKERS = {"fork": "o", "spawn": "s", "forkserver": "^", None: "D"}
_METHOD_ORDER = {"fork": 0, "spawn": 1, "forkserver": 2, None: 3}

# Timeline: batch ticks alternate between two greys per epoch; pauses are red.
_EPOCH_COLORS = ("#222222", "#9a9a9a")
_PAUSE_COLOR = "#d62728"
_STARTUP_COLOR = "#c9c9c9"
_MAX_TIMELINE_ROWS = 4

_INSTALL_HINT = (
    "the bench figure needs matplotlib, an optional dependency of nostall: "
    "pip install 'nostall[plot]' (or: pip install matplotlib)"
)


def plot_bench(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str | None = None,
    timeline_runs: Sequence[int] | None = None,
) -> Path:
    """Write the bench figure of ``records`` to the PNG ``path``; return its path.

    ``records``: run records as in the bench JSON; failures (no ``samples_per_s``)
    are skipped, and runs without ``timeline_s`` are left out of the timeline.
    When the records hold several workloads, the most frequent one is drawn
    (their samples/s do not share a scale). ``title``: default derived from the
    workload, batch size and epochs. ``timeline_runs``: indices into ``records``
    of the runs to show on the timeline, top to bottom (default: chosen to show
    the pauses); failed runs, runs without a timeline and runs of another
    workload among them are left out.
    Raises ImportError without matplotlib, ValueError without a successful run.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    import matplotlib

    indexed = _successful(records)
    if not indexed:
        raise ValueError("no successful run among the records: nothing to plot.")
    workload = Counter(_spec(r).get("workload") for _, r in indexed).most_common(1)[0][0]
    indexed = [(i, r) for i, r in indexed if _spec(r).get("workload") == workload]

    if timeline_runs is None:
        chosen = _pick_timeline_runs(indexed)
    else:
        by_index = dict(indexed)
        for i in timeline_runs:
            if not 0 <= i < len(records):
                raise ValueError(f"`timeline_runs` index {i} is out of range for {len(records)} records.")
        chosen = [(i, by_index[i]) for i in timeline_runs if i in by_index and _timeline(by_index[i])]

    # The Agg canvas is used directly (no pyplot): no display needed, and the
    # caller's pyplot backend and open figures are left alone.
    with matplotlib.rc_context({"font.size": 11, "axes.titlesize": 13, "legend.fontsize": 10}):
        fig = Figure(figsize=(16, 7), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.55]})
        _draw_throughput(left, indexed)
        pause_labels = _draw_timeline(right, chosen)
        fig.suptitle(title if title is not None else _default_title(indexed), fontsize=15, weight="bold")
        # Where labels land is known only once the layout is done.
        fig.draw_without_rendering()
        _drop_overlapping(pause_labels, fig.canvas.get_renderer())
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=100)
    return out


# --------------------------------------------------------------------------- #
# Reading records
# --------------------------------------------------------------------------- #


def _spec(record: Mapping[str, Any]) -> Mapping[str, Any]:
    return record.get("spec") or {}


def _float(value: Any) -> float:
    """A finite float, or nan (JSON writes nan as null)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _successful(records: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    """(index, record) of the runs that completed (failures have no samples/s)."""
    return [
        (i, r)
        for i, r in enumerate(records)
        if isinstance(r, Mapping) and _spec(r) and not math.isnan(_float(r.get("samples_per_s")))
    ]


def _workers(record: Mapping[str, Any]) -> int:
    return int(_spec(record).get("num_workers") or 0)


def _persistent(record: Mapping[str, Any]) -> bool | None:
    """Whether workers persist (None: no workers); None in the spec is the loader default."""
    spec = _spec(record)
    if _workers(record) == 0:
        return None
    if spec.get("persistent") is not None:
        return bool(spec["persistent"])
    return spec.get("loader") == "nostall"


def _method(record: Mapping[str, Any]) -> str | None:
    return _spec(record).get("start_method") if _workers(record) else None


def _max_pause(record: Mapping[str, Any]) -> float:
    pauses = [p for p in map(_float, record.get("epoch_pauses_s") or ()) if not math.isnan(p)]
    return max(pauses) if pauses else math.nan


def _timeline(record: Mapping[str, Any]) -> list[list[float]]:
    """The run's batch arrival times per epoch ([] when it has none)."""
    epochs = []
    for epoch in record.get("timeline_s") or ():
        times = [t for t in map(_float, epoch or ()) if not math.isnan(t)]
        if times:
            epochs.append(sorted(times))
    return epochs


def _series_label(loader: str, persistent: bool | None, method: str | None) -> str:
    parts = [loader]
    # nostall's workers persist by default, so only the exception is named.
    if persistent is not None and (loader != "nostall" or not persistent):
        parts.append("persistent" if persistent else "transient")
    if persistent is None:
        parts.append("0 workers")
    else:
        parts.append(method or "default start")
    return ", ".join(parts)


def _run_label(record: Mapping[str, Any]) -> str:
    """Two lines for a timeline row: the configuration, then its longest pause."""
    loader = _spec(record).get("loader", "?")
    workers = _workers(record)
    first = f"{loader}, {workers} worker{'s' if workers != 1 else ''}"
    if workers:
        first += f", {_method(record) or 'default start'}"
        second = "persistent" if _persistent(record) else "transient"
    else:
        second = "in process"
    pause = _max_pause(record)
    if not math.isnan(pause):
        second += f", max pause {_seconds(pause)}"
    return f"{first}\n{second}"


def _seconds(value: float) -> str:
    """About three significant digits, so that near-zero pauses do not read as 0.00 s."""
    if value >= 9.95:
        return f"{value:.1f} s"
    return f"{value:.2f} s" if value >= 0.0995 else f"{value:.3f} s"


def _distinct(values: Sequence[Any]) -> str:
    """The distinct values joined with "/" (``"frames/tiny"``), "?" when none is known."""
    distinct = sorted({v for v in values if v is not None}, key=str)
    return "/".join(str(v) for v in distinct) or "?"


def _default_title(indexed: Sequence[tuple[int, Mapping[str, Any]]]) -> str:
    specs = [_spec(r) for _, r in indexed]
    title = (
        f"nostall bench: {_distinct([s.get('workload') for s in specs])} workload, "
        f"batch size {_distinct([s.get('batch_size') for s in specs])}, "
        f"{_distinct([s.get('epochs') for s in specs])} epochs"
    )
    steps = {_float(s.get("step_ms")) for s in specs} - {0.0}
    steps = {s for s in steps if not math.isnan(s)}
    if steps:
        title += f", {'/'.join(f'{s:g}' for s in sorted(steps))} ms training step per batch"
    return title


# --------------------------------------------------------------------------- #
# Left panel: samples/s against num_workers
# --------------------------------------------------------------------------- #


def _draw_throughput(ax: Any, indexed: Sequence[tuple[int, Mapping[str, Any]]]) -> None:
    zero: dict[str, list[float]] = {}
    series: dict[tuple[str, bool | None, str | None], dict[int, list[float]]] = {}
    for _, r in indexed:
        loader = str(_spec(r).get("loader", "?"))
        rate = _float(r["samples_per_s"])
        if _workers(r) == 0:
            zero.setdefault(loader, []).append(rate)
        else:
            key = (loader, _persistent(r), _method(r))
            series.setdefault(key, {}).setdefault(_workers(r), []).append(rate)
    # The 0-worker run has no start method or persistence: it starts every line of its loader.
    for loader, rates in zero.items():
        keys = [k for k in series if k[0] == loader] or [(loader, None, None)]
        for key in keys:
            series.setdefault(key, {})[0] = rates

    loader_rank = {"torch": 0, "nostall": 1}

    def order(key: tuple[str, bool | None, str | None]) -> tuple[int, str, int, int]:
        loader, persistent, method = key
        return (loader_rank.get(loader, 2), loader, {False: 0, True: 1, None: 2}[persistent],
                _METHOD_ORDER.get(method, 4))

    for key in sorted(series, key=order):
        loader, persistent, method = key
        points = sorted((w, statistics.median(v)) for w, v in series[key].items())
        ax.plot(
            [w for w, _ in points],
            [v for _, v in points],
            label=_series_label(loader, persistent, method),
            color=_LOADER_COLORS.get(loader, _OTHER_COLOR),
            linestyle=_LINESTYLES[persistent],
            marker=_MARKERS.get(method, "D"),
            markersize=8,
            linewidth=2,
            # Transient lines are drawn over persistent ones where they coincide (0 workers).
            zorder=3 if persistent is False else 2,
        )
    workers = sorted({_workers(r) for _, r in indexed})
    ax.set_xticks(workers)
    if len(workers) > 1:
        pad = 0.04 * (workers[-1] - workers[0])
        ax.set_xlim(workers[0] - pad, workers[-1] + pad)
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.05)
    ax.set_xlabel("num_workers")
    ax.set_ylabel("samples/s")
    ax.set_title("Throughput: samples/s over the whole run (higher is better)")
    ax.grid(True, alpha=0.3)
    # Below the axes, so it never covers a point.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, frameon=False)


# --------------------------------------------------------------------------- #
# Right panel: timeline of batch arrivals
# --------------------------------------------------------------------------- #


def _pick_timeline_runs(
    indexed: Sequence[tuple[int, Mapping[str, Any]]],
) -> list[tuple[int, Mapping[str, Any]]]:
    """The runs that tell the story, top to bottom.

    At the num_workers and start method where torch's transient pause is largest:
    torch transient, torch persistent and nostall, then torch's 0-worker run.
    Missing roles fall back to the same num_workers with another start method.
    """
    candidates = [(i, r) for i, r in indexed if _timeline(r)]
    if not candidates:
        return []

    def pause_key(item: tuple[int, Mapping[str, Any]]) -> float:
        pause = _max_pause(item[1])
        return -math.inf if math.isnan(pause) else pause

    with_workers = [c for c in candidates if _workers(c[1])]
    transient_torch = [c for c in with_workers if _spec(c[1]).get("loader") == "torch" and not _persistent(c[1])]
    anchor_pool = transient_torch or with_workers
    if not anchor_pool:
        return candidates[:_MAX_TIMELINE_ROWS]
    anchor = max(anchor_pool, key=pause_key)[1]
    workers, method = _workers(anchor), _method(anchor)

    def find(loader: str, persistent: bool | None, n: int) -> tuple[int, Mapping[str, Any]] | None:
        matches = [
            c for c in candidates
            if _spec(c[1]).get("loader") == loader and _workers(c[1]) == n
            and (persistent is None or _persistent(c[1]) == persistent)
        ]
        same_method = [c for c in matches if _method(c[1]) == method]
        return (same_method or matches or [None])[0]

    roles = [
        find("torch", False, workers),
        find("torch", True, workers),
        find("nostall", True, workers) or find("nostall", None, workers),
        find("torch", None, 0) or find("nostall", None, 0),
    ]
    chosen: list[tuple[int, Mapping[str, Any]]] = []
    for role in roles:
        if role is not None and all(role[0] != c[0] for c in chosen):
            chosen.append(role)
    # Too few for a comparison: add the runs with the longest pauses.
    for c in sorted(candidates, key=pause_key, reverse=True):
        if len(chosen) >= 2:
            break
        if all(c[0] != k[0] for k in chosen):
            chosen.append(c)
    return chosen[:_MAX_TIMELINE_ROWS]


def _draw_timeline(ax: Any, chosen: Sequence[tuple[int, Mapping[str, Any]]]) -> list[list[Any]]:
    """Draw the rows; return each row's pause labels (left to right)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.set_title("Batch arrivals: each tick is one batch; red spans are the pauses between epochs")
    ax.set_xlabel("time since the loader was constructed (s)")
    if not chosen:
        ax.text(0.5, 0.5, "no batch arrival times in these results", ha="center", va="center",
                transform=ax.transAxes, fontsize=13, color="#666666")
        ax.set_axis_off()
        return []

    end = max(t for _, r in chosen for epoch in _timeline(r) for t in epoch)
    xmax = end * 1.12 if end > 0 else 1.0  # room for the "done" labels
    labels: list[list[Any]] = []
    for row, (_, record) in enumerate(chosen):
        epochs = _timeline(record)
        labels.append([])
        step_ms = _float(_spec(record).get("step_ms"))
        step_s = step_ms / 1000.0 if step_ms > 0 else 0.0  # nan > 0 is False
        # Before the first batch: worker start-up (and the first batches' work).
        ax.broken_barh([(0, epochs[0][0])], (row - 0.3, 0.6), facecolors=_STARTUP_COLOR,
                       edgecolor="none", hatch="//", alpha=0.6, zorder=1)
        for e, times in enumerate(epochs):
            ax.eventplot(times, lineoffsets=row, linelengths=0.5, linewidths=1.0,
                         colors=_EPOCH_COLORS[e % 2], zorder=3)
        for before, after in itertools.pairwise(epochs):
            # The pause as the bench measures it: from the end of the last batch's
            # training step to the first batch of the next epoch.
            start = min(before[-1] + step_s, after[0])
            pause = after[0] - start
            ax.broken_barh([(start, pause)], (row - 0.34, 0.68), facecolors=_PAUSE_COLOR,
                           edgecolor=_PAUSE_COLOR, linewidth=0.8, alpha=0.35, zorder=2)
            if pause >= 0.01 * xmax:  # wide enough to be seen: say how long
                labels[-1].append(ax.text(
                    start + pause / 2, row - 0.36, _seconds(pause), ha="center", va="bottom",
                    fontsize=10, color="#a01818", weight="bold", zorder=4))
        last = epochs[-1][-1]
        ax.text(last + 0.008 * xmax, row, f"done {_seconds(last)}", ha="left", va="center",
                fontsize=9.5, color="#333333", zorder=4)

    ax.set_xlim(0, xmax)
    ax.set_ylim(len(chosen) - 0.5, -0.75)  # first run on top; room for its pause labels
    ax.set_yticks(range(len(chosen)), [_run_label(r) for _, r in chosen])
    for label, (_, record) in zip(ax.get_yticklabels(), chosen):
        label.set_color(_LOADER_COLORS.get(_spec(record).get("loader"), _OTHER_COLOR))
    ax.tick_params(axis="y", length=0)
    ax.grid(True, axis="x", alpha=0.3)
    handles = [
        Line2D([], [], color=_EPOCH_COLORS[0], marker="|", linestyle="none", markersize=12,
               markeredgewidth=1.5, label="batch (epochs 1, 3, ...)"),
        Line2D([], [], color=_EPOCH_COLORS[1], marker="|", linestyle="none", markersize=12,
               markeredgewidth=1.5, label="batch (epochs 2, 4, ...)"),
        Patch(facecolor=_PAUSE_COLOR, alpha=0.35, edgecolor=_PAUSE_COLOR, label="pause between epochs"),
        Patch(facecolor=_STARTUP_COLOR, alpha=0.6, hatch="//", edgecolor="none", label="before the first batch"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=4, frameon=False,
              columnspacing=1.4)
    return labels


def _drop_overlapping(rows: Sequence[Sequence[Any]], renderer: Any) -> None:
    """Remove each label that would overlap the last one kept in its row."""
    for row in rows:
        kept = None
        for text in row:
            box = text.get_window_extent(renderer)
            if kept is not None and box.x0 < kept.x1 + 4:  # 4 px of air between labels
                text.remove()
            else:
                kept = box
