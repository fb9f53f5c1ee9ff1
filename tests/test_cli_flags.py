"""The CLI is derived from RefineryConfig: every setting flag is one config field, once, with its default."""
from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from core.config import RefineryConfig, load_config
from flows.cli import build_parser
from flows.cli_flags import PREFIX, _strip_optional, model_at, overrides

ROOT = Path(__file__).resolve().parent.parent
SUB = next(a for a in build_parser()._actions if a.dest == "command").choices


def _config_actions(cmd: str):
    return [a for a in SUB[cmd]._actions if a.dest.startswith(PREFIX)]


def _field(dest: str):
    section, name = dest[len(PREFIX):].rsplit(".", 1)
    return model_at(section).model_fields[name]


@pytest.mark.parametrize("cmd", sorted(SUB))
def test_each_setting_once_with_its_config_default(cmd):
    actions = _config_actions(cmd)
    dests = [a.dest for a in actions]
    assert len(dests) == len(set(dests)), f"{cmd}: a setting appears twice"
    defaults = RefineryConfig().model_dump()
    for a in actions:
        info = _field(a.dest)                                      # the flag names a real field
        assert not a.option_strings or "default" in (a.help or ""), f"{cmd} {a.option_strings}: no default"
        value = defaults
        for part in a.dest[len(PREFIX):].split("."):
            value = value[part]
        if a.option_strings and not isinstance(value, (bool, list)) and value is not None \
                and "default:" not in (info.description or ""):
            shown = str(value).replace(str(ROOT) + "/", "")
            assert f"default: {shown}" in a.help.replace("%%", "%"), (cmd, a.option_strings, a.help)


def _sample_value(a) -> tuple[list[str], object]:
    if a.choices:
        return [a.choices[-1]], a.choices[-1]
    info = _field(a.dest)
    base = _strip_optional(info.annotation)
    if typing.get_origin(base) is list:
        return ["x1", "x2"], ["x1", "x2"]
    if base is bool:
        return [], None
    if base is int:
        return ["7"], 7
    if base is float:
        return ["0.5"], 0.5
    return ["abc"], "abc"


@pytest.mark.parametrize("cmd", ["crawl", "extract", "curate", "shard", "train", "finetune", "plan", "ablate",
                                 "eval", "serve", "run"])
def test_every_flag_overrides_its_field(cmd):
    required = {"crawl": ["--seeds", "s", "--out", "o"], "extract": ["i", "--out", "o"], "curate": ["i", "--out", "o"],
                "shard": ["i", "--out", "o"], "train": ["s", "--out", "o"], "finetune": ["b", "--data", "d", "--out", "o"],
                "plan": ["--params", "1e8"], "eval": ["--model", "m"], "ablate": [], "serve": [], "run": []}[cmd]
    parser = build_parser()
    for a in _config_actions(cmd):
        if not a.option_strings:
            continue
        words, want = _sample_value(a)
        flag = a.option_strings[0]
        if words == []:                                            # bool: --x and --no-x
            for argv, want in (([flag], True), ([f"--no-{flag[2:]}"], False)):
                got = overrides(parser.parse_args([cmd, *required, *argv]))
                assert got[a.dest[len(PREFIX):]] is want
            continue
        ns = parser.parse_args([cmd, *required, flag, *words])
        assert overrides(ns)[a.dest[len(PREFIX):]] == want, (cmd, flag)


def test_unset_flags_leave_the_config_file_alone(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 0.5\n  seq_len: 64\ncurate:\n  quality:\n    reference: [a, b]\n")
    ns = build_parser().parse_args(["train", "s", "--out", "o", "--config", str(y), "--seq-len", "32"])
    cfg = load_config(ns.config, overrides(ns))
    assert cfg.train.lr == 0.5 and cfg.train.seq_len == 32           # file kept, flag wins
    ns = build_parser().parse_args(["curate", "i", "--out", "o", "--reference", "r1", "--reference", "r2", "r3",
                                    "--set", "curate.quality.target_keep_ratio=0.1", "--target-keep-ratio", "0.03"])
    cfg = load_config(None, overrides(ns))
    assert cfg.curate.quality.reference == ["r1", "r2", "r3"]        # repeatable and multi-valued
    assert cfg.curate.quality.target_keep_ratio == 0.03              # a flag is more specific than --set


def test_positional_base_is_finetune_base_and_aliases_map_to_one_field():
    ns = build_parser().parse_args(["finetune", "smol.gguf", "--data", "d", "--out", "o", "--lora-r", "4"])
    assert overrides(ns) == {"finetune.base": "smol.gguf", "finetune.lora_r": 4}
    ns = build_parser().parse_args(["plan", "--params", "1e8", "--gpus", "8", "--micro-batch", "2",
                                    "--keep-ratio", "0.01"])
    assert overrides(ns) == {"train.devices": 8, "train.batch_size": 2, "curate.quality.target_keep_ratio": 0.01}


def test_invalid_flag_values_fail_with_the_field_name():
    from core.config import ConfigError

    ns = build_parser().parse_args(["train", "s", "--out", "o", "--lr", "-1"])
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, overrides(ns))
    with pytest.raises(SystemExit):                                  # a Literal's choices are argparse's
        build_parser().parse_args(["train", "s", "--out", "o", "--precision", "fp8"])


def test_every_flag_the_readme_shows_exists():
    text = (ROOT / "README.md").read_text()
    seen = 0
    for m in re.finditer(r"^\$? ?refinery (\w+)((?:.*\\\n)*.*)$", text, re.M):
        cmd, rest = m.group(1), m.group(2)
        if cmd not in SUB:
            continue
        known = {o for a in SUB[cmd]._actions for o in a.option_strings}
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest.split("#")[0]):
            assert flag in known, f"README: refinery {cmd} {flag}"
            seen += 1
    assert seen > 40


def test_every_curate_section_with_settings_has_flags():
    """A section added to the curate config gets its flags with no edit to the CLI."""
    from pydantic import BaseModel

    from core.config import CurateConfig

    def leaves(model, path):
        own = [f for f in model.model_fields.values() if not (isinstance(f.annotation, type)
                                                               and issubclass(f.annotation, BaseModel))]
        found = {path} if own else set()
        for name, f in model.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                found |= leaves(f.annotation, f"{path}.{name}")
        return found

    exposed = {a.dest[len(PREFIX):].rsplit(".", 1)[0] for a in _config_actions("curate")}
    assert leaves(CurateConfig, "curate") == exposed - {"runner"}


def test_plan_mfu_help_shows_the_planners_own_default():
    import inspect

    from models.planner import plan

    mfu = next(a for a in SUB["plan"]._actions if "--mfu" in a.option_strings)
    assert f"default: {inspect.signature(plan).parameters['mfu'].default}" in mfu.help
