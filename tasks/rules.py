"""Heuristic text-quality rules, in FineWeb's order: Gopher repetition, Gopher quality, C4, FineWeb.

Each family is a module with a one-document `check` (rules_gopher, rules_c4, rules_fineweb) and one
step in the declared list `tasks.curate.FILTER_STEPS`, which fixes their order. Pure Python and no
Prefect: `apply_rules` runs those steps on one text and stops at the first failing rule. Every
threshold comes from `core.config.RulesConfig`; the modules say where they follow the papers and
where DataTrove 0.10 (what FineWeb ran), and why.
"""
from __future__ import annotations

from core.config import GopherRepetitionConfig, RulesConfig
from tasks import rules_c4, rules_fineweb, rules_gopher

RULES_SECTION = "curate.rules."   # a rule family's step reads curate.rules.<family>

# n-gram codes follow the configured n; these are the defaults' (a custom n adds its own code)
RULE_CODES: list[str] = (
    [f"gopher_repetition:{c}" for c in rules_gopher.repetition_codes(GopherRepetitionConfig())]
    + [f"gopher_quality:{c}" for c in rules_gopher.QUALITY_CODES]
    + [f"c4:{c}" for c in rules_c4.CODES]
    + [f"fineweb:{c}" for c in rules_fineweb.CODES]
)


def apply_rules(text: str, cfg: RulesConfig) -> tuple[str, str | None, str]:
    """Returns (text, reason, detail): text as C4's line rules edited it; reason None if the
    document passes, else 'family:rule'; detail the measured value against its threshold."""
    from tasks.curate import FILTER_STEPS   # the one declared order (tasks.curate imports the rule modules)

    for step in FILTER_STEPS:
        if step.section and step.section.startswith(RULES_SECTION):
            text, reason, detail = step.fn.check(text, getattr(cfg, step.section.removeprefix(RULES_SECTION)))
            if reason:
                return text, reason, detail
    return text, None, ""
