"""Draw docs/img/who_waits.png: one training step on K=3 devices for each method.

    python docs/make_figures.py

A schematic, not a measurement: forward takes 1 unit per module, backward 2 (the
usual ratio), FR's replay adds a forward; the timelines follow the dependencies
each method has inside one step, as replay_opt runs it (every backward starts
with the user's loss.backward(), once module K's forward is done).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"forward": "#4C72B0", "backward": "#DD8452", "replay": "#55A868", "aux": "#8172B2"}
K = 3


def schedules() -> dict[str, list[list[tuple[float, float, str]]]]:
    """Per method, per device: (start, duration, kind) boxes."""
    bp = [[(k, 1, "forward"), (K + 2 * (K - 1 - k), 2, "backward")] for k in range(K)]
    # In replay_opt every backward starts with the user's loss.backward(), right after module K's forward.
    last = [(K - 1, 1, "forward"), (K, 2, "backward")]
    fr = [[(k, 1, "forward"), (k + 1, 1, "replay"), (K, 2, "backward")] for k in range(K - 1)] + [last]
    ddg = [[(k, 1, "forward"), (K, 2, "backward")] for k in range(K)]
    dni = [[(k, 1, "forward"), (k + 1, 0.4, "aux"), (K, 2, "backward")] for k in range(K - 1)] + [last]
    dgl = dni
    return {
        "BP: backward locked (each device waits for the one above)": bp,
        "FR: replay + backward of all devices at once (stale gradient from t-1)": fr,
        "DDG: backward through a kept graph at once (stale gradient from t-1)": ddg,
        "DNI: backward with a synthetic gradient (synthesizer in purple)": dni,
        "DGL: backward from a local auxiliary head (head in purple)": dgl,
    }


def main() -> None:
    plans = schedules()
    fig, axes = plt.subplots(len(plans), 1, figsize=(9, 1.5 * len(plans)), sharex=True)
    for ax, (title, devices) in zip(axes, plans.items()):
        end = 0.0
        for k, boxes in enumerate(devices):
            for start, width, kind in boxes:
                ax.broken_barh([(start, width)], (K - 1 - k - 0.4, 0.8), color=COLORS[kind])
                end = max(end, start + width)
        ax.set_yticks(range(K), [f"device {K - i}" for i in range(K)])
        ax.set_title(f"{title} -- step ends at {end:g}", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("time (forward of one module = 1)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    fig.legend(handles, list(COLORS), loc="upper right", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(__file__).parent / "img" / "who_waits.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
