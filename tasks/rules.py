"""Heuristic text-quality rules, in FineWeb's order: Gopher repetition, Gopher quality, C4, FineWeb.

Pure Python and no Prefect: `apply_rules` runs on one document and stops at the first failing
rule. Every threshold comes from `core.config.RulesConfig`; the modules say where they follow
the papers and where DataTrove 0.10 (what FineWeb ran), and why.
"""
from __future__ import annotations

from core.config import GopherRepetitionConfig, RulesConfig
from tasks import rules_c4, rules_fineweb, rules_gopher

FAMILIES = [  # (RulesConfig attribute = reason prefix, check); the order is FineWeb's
    ("gopher_repetition", rules_gopher.check_repetition),
    ("gopher_quality", rules_gopher.check_quality),
    ("c4", rules_c4.check),
    ("fineweb", rules_fineweb.check),
]

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
    for name, check in FAMILIES:
        text, reason, detail = check(text, getattr(cfg, name))
        if reason:
            return text, reason, detail
    return text, None, ""
