"""bench/e2e.py's report: the printed tables (per side and scale, linear fits, ours / DataTrove on
the matching steps) and the plots (docs/bench-e2e-*.png); works from a live run or a saved --json."""
from __future__ import annotations

import os
from pathlib import Path

from e2e_measure import DT_STAGES, OURS_STAGES, SEGMENT_COLORS

# our sub-phases (map_shards task names) and the DataTrove executors they match
MATCH = {"extract": (["extract"], ["extract"]),
         "langid + rules + signatures": (["curate-filter"], ["filter"]),
         "MinHash dedup": (["dedup-reduce"], ["buckets", "cluster", "dedup_filter"])}


def matched_seconds(summary: dict, side: str, key: str) -> float:
    ours_names, dt_names = MATCH[key]
    if side.startswith("ours"):
        if key == "extract":
            return summary["stages"]["extract"]["seconds"]
        return sum(summary["phases"].get(n, 0.0) for n in ours_names)
    return sum(summary["stages"][n]["seconds"] for n in dt_names)


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        return {"slope": None, "intercept": None, "r2": None}
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    icpt = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    return {"slope": slope, "intercept": icpt, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def report(results: dict, corpora: dict, args, second: dict | None = None) -> None:
    sides = [k for k in results if results[k]]
    scales = sorted(corpora)
    print()
    print(f"machine: {os.cpu_count()} cores; workers N = {args.workers}; rounds: {args.rounds} (best wall kept)")
    print("corpus per scale:")
    for s in scales:
        print(f"  {s}x: " + ", ".join(f"{k} {v}" for k, v in corpora[s].items()))
    for side in sides:
        stages = DT_STAGES if side == "datatrove" else OURS_STAGES
        print(f"\n== {side} ==")
        for s in scales:
            sm = results[side][s]
            print(f"  {s}x, {sm['pages']} page records: wall {sm['wall']:.1f}s, {sm['pages_per_s']:.2f} pages/s, "
                  f"peak PSS {sm['peak_pss_mib']:.0f} MiB (sum of RSS {sm['peak_rss_mib']:.0f}), up to "
                  f"{sm['max_procs']} processes; CPU {sm['cpu_s']:.0f}s; other processes used "
                  f"{sm['others_cores']:.2f} of {os.cpu_count()} cores meanwhile")
            print("     time: " + " | ".join(f"{k} {v:.1f}s {v / sm['wall']:.0%}" for k, v in sm["segments"] if v > 0.05))
            cells = []
            for st in ["startup"] + stages:
                r = sm["stages"].get(st)
                if r:
                    pps = f", {r['pages_per_s']:.1f} pages/s" if st not in ("startup", "train") else ""
                    cpu = f", CPU {r['cpu_s']:.0f}s" if r.get("cpu_s") else ""
                    cells.append(f"{st} {r['seconds']:.1f}s{pps}{cpu}, peak {r['peak_pss_mib']:.0f} MiB")
            print("     stages: " + " | ".join(cells))
            print(f"     counts: {sm['counts']}")
            if sm.get("peak_by_process"):
                print("     at the peak: " + " | ".join(f"{m:.0f} MiB {c.split(' -m ')[-1][:40]}"
                                                     for m, c in sm["peak_by_process"][:5]))
    print("\n== linearity: wall seconds = a + b x pages (least squares over the scales) ==")
    for side in sides:
        xs = [results[side][s]["pages"] for s in scales]
        names = [n for n, _ in results[side][scales[0]]["segments"]]
        seg = lambda s, n: dict(results[side][s]["segments"]).get(n, 0.0)  # noqa: E731
        for label, ys in [("whole run", [results[side][s]["wall"] for s in scales])] + \
                [(n, [seg(s, n) for s in scales]) for n in names if n != "finish"]:
            fit = linear_fit(xs, ys)
            per = ", ".join(f"{1000 * y / x:.1f}" for x, y in zip(xs, ys))
            if fit["slope"] is None:
                print(f"  {side:9} {label:27} ms/page at each scale: {per}")
                continue
            print(f"  {side:9} {label:27} b = {1000 * fit['slope']:6.1f} ms/page, a = {fit['intercept']:6.1f} s, "
                  f"R^2 = {fit['r2']:.3f}; ms/page at each scale: {per}")
        cpu = [results[side][s]["cpu_s"] for s in scales]
        fit = linear_fit(xs, cpu)
        if fit["slope"] is not None:  # CPU time: far less sensitive than wall time to other jobs on the cores
            print(f"  {side:9} {'CPU-seconds, process tree':27} b = {1000 * fit['slope']:6.1f} ms/page, a = "
                  f"{fit['intercept']:6.1f} s, R^2 = {fit['r2']:.3f}; ms/page at each scale: "
                  + ", ".join(f"{1000 * y / x:.1f}" for x, y in zip(xs, cpu)))
        mem = linear_fit(xs, [results[side][s]["peak_pss_mib"] for s in scales])
        if mem["slope"] is not None:
            print(f"  {side:9} {'peak PSS':27} b = {1000 * mem['slope']:.1f} MiB per 1000 pages, a = {mem['intercept']:.0f} "
                  f"MiB, R^2 = {mem['r2']:.4f}")
    for ours in [x for x in sides if x.startswith("ours") and "datatrove" in results]:
        print(f"\n== {ours} / DataTrove, pages/s on the matching steps (> 1: ours faster) ==")
        for s in scales:
            o, d = results[ours][s], results["datatrove"][s]
            cells = []
            for key in MATCH:
                so, sd = matched_seconds(o, "ours", key), matched_seconds(d, "datatrove", key)
                cells.append(f"{key}: {so:.1f}s vs {sd:.1f}s = {sd / so:.2f}x")
            so = sum(matched_seconds(o, "ours", k) for k in MATCH)
            sd = sum(matched_seconds(d, "datatrove", k) for k in MATCH)
            cells.append(f"all matching steps: {so:.1f}s vs {sd:.1f}s = {sd / so:.2f}x")
            cells.append(f"whole runs (ours does more): {o['wall']:.1f}s vs {d['wall']:.1f}s = {d['wall'] / o['wall']:.2f}x")
            cells.append(f"whole runs, CPU-seconds: {o['cpu_s']:.0f} vs {d['cpu_s']:.0f} = {d['cpu_s'] / o['cpu_s']:.2f}x")
            print(f"  {s}x: " + "; ".join(cells))
    if second:
        a, b = second["first"], second["second"]
        print(f"\n== ours, a second run into a new folder ({second['scale']}x, the same corpus; {second['cached']} task "
              f"runs from cache) ==\n  wall {b['wall']:.1f}s = {b['wall'] / a['wall']:.0%} of the first ({a['wall']:.1f}s); "
              f"CPU {b['cpu_s']:.0f}s vs {a['cpu_s']:.0f}s; startup {b['stages']['startup']['seconds']:.1f}s; peak PSS "
              f"{b['peak_pss_mib']:.0f} MiB")
    for side in sides:
        if side.startswith("ours") and side != "ours" and "ours" in results:
            print(f"\n== {side} / ours (threads) whole run: " + ", ".join(
                f"{s}x {results['ours'][s]['wall'] / results[side][s]['wall']:.2f}x" for s in scales if s in results[side]))


def plots(results: dict, corpora: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    scales = sorted(corpora)
    sides = [k for k in results if results[k]]
    colors = {"ours": "tab:blue", "ours-dask": "tab:cyan", "datatrove": "tab:orange"}
    label = {"ours": "refinery (threads)", "ours-dask": "refinery (dask)", "datatrove": "DataTrove 0.10.1"}
    paths = []

    # 1. wall time and peak memory against pages, with the linear fits
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(12, 3.6))
    for side in sides:
        xs = [results[side][s]["pages"] for s in scales]
        for ax, ys in ((ax1, [results[side][s]["wall"] for s in scales]),
                       (ax3, [results[side][s]["cpu_s"] for s in scales]),
                       (ax2, [results[side][s]["peak_pss_mib"] for s in scales])):
            ax.plot(xs, ys, "o", color=colors.get(side))
            fit = linear_fit(xs, ys)
            if fit["slope"] is not None:
                grid = [0, max(xs) * 1.05]
                ax.plot(grid, [fit["intercept"] + fit["slope"] * g for g in grid], "-", color=colors.get(side),
                        label=f"{label.get(side, side)} (R²={fit['r2']:.3f})")
    if "ours" in results:  # the matching steps only: the comparable part of ours
        xs = [results["ours"][s]["pages"] for s in scales]
        ys = [sum(matched_seconds(results["ours"][s], "ours", k) for k in MATCH) for s in scales]
        ax1.plot(xs, ys, "s--", color=colors["ours"], alpha=0.6, label="refinery, matching steps only")
    ax1.set(xlabel="page records", ylabel="wall seconds", title="Wall time")
    ax2.set(xlabel="page records", ylabel="MiB (PSS, process tree)", title="Peak memory")
    ax3.set(xlabel="page records", ylabel="CPU-seconds (process tree)", title="CPU time")
    for ax in (ax1, ax3, ax2):
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "bench-e2e-scaling.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    # 2. where the time goes: segment seconds (left) and shares of the wall time (right), per side and scale
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 + 0.42 * len(scales) * len(sides) + 1.6), sharey=True)
    rows = [(s, side) for s in scales for side in sides]
    ys = [i + (i // len(sides)) * 0.5 for i in range(len(rows))]
    seen: set = set()
    for y, (s, side) in zip(ys, rows):
        sm = results[side][s]
        for ax, scale_by in ((axes[0], 1.0), (axes[1], 100.0 / sm["wall"])):
            left = 0.0
            for name, sec in sm["segments"]:
                if sec <= 0:
                    continue
                ax.barh(y, sec * scale_by, left=left, color=SEGMENT_COLORS[name], edgecolor="white", linewidth=0.5,
                        label=name if (name not in seen and ax is axes[0]) else None)
                if ax is axes[0]:
                    seen.add(name)
                left += sec * scale_by
    axes[0].set_yticks(ys, [f"{s}x {label.get(side, side)}" for s, side in rows], fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set(xlabel="wall seconds", title="Where the wall time goes")
    axes[1].set(xlabel="% of the run's wall time", xlim=(0, 100), title="Shares")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=7, ncol=6, loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    paths.append(folder / "bench-e2e-stages.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    # 3. memory over time at the largest scale
    fig, ax = plt.subplots(figsize=(9, 3.2))
    s = scales[-1]
    for side in sides:
        series = results[side][s]["mem_series"]
        ax.plot([t for t, _ in series], [m for _, m in series], color=colors.get(side), label=label.get(side, side))
    for side in sides:  # where each run's stages start
        for st, r in results[side][s]["stages"].items():
            if st in ("startup", "finish", "cluster", "buckets", "dedup_filter"):
                continue
            x = r["t"][0] - results[side][s]["start"]
            ax.axvline(x, color=colors.get(side), lw=0.6, ls=":")
            ax.text(x, 5 if side == "datatrove" else ax.get_ylim()[1] * 0.93, f" {st}", fontsize=6,
                    color=colors.get(side), va="bottom" if side == "datatrove" else "top")
    ax.set(xlabel="seconds since start", ylabel="MiB (PSS, process tree)",
           title=f"Memory over time, {s}x ({results[sides[0]][s]['pages']} page records)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "bench-e2e-memory.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths
