"""Bias audit: did curation remove documents that mention some identity groups more often
than documents in general? (Word-list and quality filters are known to remove text about
minorities disproportionately; Dodge et al. 2021 on C4.)

For each group of tasks/bias_groups.yaml, the removal rate of documents mentioning it is
compared with the overall removal rate; a ratio >= `disparity_ratio` on at least
`min_mentions` documents is flagged. Optionally, per-stage removal counts show which
stage did the removing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.config import BiasConfig
from tasks.bias_terms import group_regexes, load_groups

ALL = "*"  # in a per-stage dict: documents of any kind that stage removed


def mentions(texts: list[str], groups_file: str) -> dict[str, np.ndarray]:
    """group -> bool per text: does the text contain a term of the group (whole word, any case)."""
    return {g: np.fromiter((rx.search(t) is not None for t in texts), dtype=bool, count=len(texts))
            for g, rx in group_regexes(str(groups_file)).items()}


def counts(found: dict[str, np.ndarray], where: np.ndarray | None = None) -> dict[str, int]:
    """Documents mentioning each group, optionally only among `where` (e.g. a stage's removed mask)."""
    return {g: int(m.sum() if where is None else (m & where).sum()) for g, m in found.items()}


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def audit(before: dict[str, int], after: dict[str, int], n_before: int, n_after: int, cfg: BiasConfig,
          stages: dict[str, dict[str, int]] | None = None) -> dict:
    """Per-group removal disparity. `before`/`after`: documents mentioning each group before
    curation and among the kept ones; `n_before`/`n_after`: all documents.

    `stages` (optional): stage -> {group: documents mentioning it that the stage removed}, plus
    `"*"`: all documents the stage removed. Each group then gets `removed_by_stage`, and with
    `"*"` also `stage_ratio`: the group's share removed by that stage / everyone's share removed by it.
    Rates and ratios are None where their denominator is 0 (JSON null).
    """
    removed = n_before - n_after
    overall_rate = _rate(removed, n_before)
    # every configured group is reported, also one never mentioned: a gap in the data is a finding too
    names = list(dict.fromkeys([*load_groups(str(cfg.groups_file)), *before, *after]))
    groups = {}
    for g in names:
        m_before, m_after = before.get(g, 0), after.get(g, 0)
        rate = _rate(m_before - m_after, m_before)
        ratio = rate / overall_rate if rate is not None and overall_rate else None
        row = {"mentions_before": m_before, "mentions_after": m_after,
               "mention_rate_before": _rate(m_before, n_before), "mention_rate_after": _rate(m_after, n_after),
               "removed": m_before - m_after, "removal_rate": rate, "ratio": ratio,
               "flagged": ratio is not None and ratio >= cfg.disparity_ratio and m_before >= cfg.min_mentions}
        if stages:
            row["removed_by_stage"] = {s: by.get(g, 0) for s, by in stages.items()}
            row["stage_ratio"] = {s: (by.get(g, 0) / m_before) / (by[ALL] / n_before)
                                  if m_before and by.get(ALL) else None for s, by in stages.items()}
        groups[g] = row
    return {"overall": {"docs_before": n_before, "docs_after": n_after, "removed": removed,
                        "removal_rate": overall_rate},
            "disparity_ratio": cfg.disparity_ratio, "min_mentions": cfg.min_mentions,
            "flagged": [g for g, r in groups.items() if r["flagged"]],
            "groups": groups}


def plot_audit(report: dict, out_png: str | Path) -> None:
    """Bar per group: removal rate of documents mentioning it; dashed line: overall rate."""
    from matplotlib.figure import Figure  # object API: no pyplot global state, renders with Agg

    rows = [(g, r) for g, r in report["groups"].items() if r["removal_rate"] is not None]
    fig = Figure(figsize=(7, 0.5 * len(rows) + 1.8), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    few = report.get("min_mentions", 0)
    colors = ["#c0392b" if r["flagged"] else "#999999" if r["mentions_before"] < few else "#4c72b0"
              for _, r in rows]  # red: flagged; grey: too few mentions to be flagged
    ax.barh(y, [r["removal_rate"] for _, r in rows], color=colors)
    ax.set_yticks(y, [f"{g} (n={r['mentions_before']})" for g, r in rows])
    ax.invert_yaxis()
    overall = report["overall"]["removal_rate"]
    if overall is not None:
        ax.axvline(overall, color="black", ls="--", label=f"all documents ({overall:.1%})")
        if report.get("disparity_ratio"):
            ax.axvline(min(1.0, overall * report["disparity_ratio"]), color="#c0392b", ls=":",
                       label=f"flag at {report['disparity_ratio']}x")
        ax.legend(loc="best", fontsize="small")
    ax.set_xlim(0, 1)
    ax.set_xlabel("removal rate of documents mentioning the group")
    ax.set_title("Bias audit: removal by curation, per identity group")
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
