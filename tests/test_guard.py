"""Data roots of served runs (core/guard.py): pure checks, then a real flow refused before it writes."""
from __future__ import annotations

import os

import pytest

from core.config import RefineryConfig
from core.guard import ENV, PATH_FIELDS, PathNotAllowed, confine


@pytest.fixture
def roots(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv(ENV, str(root))
    return root


def test_paths_under_a_root_pass_and_escapes_are_refused(roots, tmp_path):
    confine(writes={"out_dir": str(roots / "run" / "x")}, reads={"inputs": [str(roots / "a.warc.gz")]})
    for bad in (str(tmp_path / "elsewhere"), str(roots / ".." / "escaped"), "/etc", str(roots) + "-sibling"):
        with pytest.raises(PathNotAllowed, match="outside the data roots"):
            confine(writes={"out_dir": bad})
    (roots / "link").symlink_to(tmp_path)                   # a symlink inside that points outside
    with pytest.raises(PathNotAllowed, match="out_dir="):
        confine(writes={"out_dir": str(roots / "link" / "run")})


def test_the_bundled_sample_is_readable_not_writable_and_config_paths_are_checked(roots, tmp_path):
    from core.config import SAMPLE

    cfg = RefineryConfig()                                  # its defaults read bundled files only
    confine(reads={"inputs": [str(SAMPLE / "warc")]}, config=cfg)
    with pytest.raises(PathNotAllowed):
        confine(writes={"out_dir": str(SAMPLE / "out")})
    evil = RefineryConfig.model_validate({"finetune": {"base": "/root/model.gguf"},
                                          "curate": {"quality": {"reference": [str(roots), "/home"]}}})
    with pytest.raises(PathNotAllowed, match=r"config\.(finetune\.base|curate\.quality\.reference)"):
        confine(config=evil)
    for section in ({"eval": {"data": ["/etc/passwd"]}}, {"curate": {"decontaminate": {"paths": ["/etc/passwd"]}}}):
        with pytest.raises(PathNotAllowed, match=r"config\.(eval\.data|curate\.decontaminate\.paths)"):
            confine(config=RefineryConfig.model_validate(section))


def test_every_path_like_config_field_is_covered():
    """A new config field naming a file must be added to PATH_FIELDS, or served runs could read anywhere."""
    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            elif k.endswith(("_path", "_file", "_dir", "_data")) or (isinstance(v, str) and os.path.isabs(v)) or \
                    (isinstance(v, list) and any(isinstance(x, str) and os.path.isabs(x) for x in v)):
                yield f"{prefix}{k}", k
    serve_only = {"serve.crawl_seeds", "serve.crawl_out"}   # the served defaults themselves, set by the operator
    missing = [path for path, k in walk(RefineryConfig().model_dump(mode="json"))
               if k not in PATH_FIELDS and path not in serve_only]
    assert not missing, missing


def test_a_flow_with_an_outside_path_fails_before_writing(roots, tmp_path, prefect_api):
    from flows.shard import shard_flow

    out = tmp_path / "outside"
    with pytest.raises(PathNotAllowed):
        shard_flow(str(roots), str(out))
    assert not out.exists()


def test_a_symlink_inside_a_root_cannot_carry_reads_outside(roots, tmp_path, monkeypatch):
    """The folder is inside the roots, the file it links to is not: refused where a step lists a folder
    (extraction inputs, HTML folders, reference text, evaluation sets), naming the file."""
    from core.eval_data import load_eval_set
    from tasks.extract import shard_inputs
    from tasks.quality import _files

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "notes.html").write_text("<html><body><p>private</p></body></html>")
    (secret / "notes.txt").write_text("private text")
    pages = roots / "pages"
    pages.mkdir()
    (pages / "ok.html").write_text("<html><body><p>public</p></body></html>")
    (pages / "leak.html").symlink_to(secret / "notes.html")
    ref = roots / "ref"
    ref.mkdir()
    (ref / "a.txt").write_text("public text")
    (ref / "b.txt").symlink_to(secret / "notes.txt")
    for read in (lambda: shard_inputs([str(pages)]), lambda: _files([str(ref)]), lambda: load_eval_set(ref)):
        with pytest.raises(PathNotAllowed, match=r"(leak\.html|b\.txt).*outside the data roots"):
            read()
    (roots / "inside.txt").write_text("fine")
    (ref / "b.txt").unlink()
    (ref / "b.txt").symlink_to(roots / "inside.txt")           # a link that stays inside is fine
    assert [p.name for p in _files([str(ref)])] == ["a.txt", "b.txt"]
    monkeypatch.delenv(ENV)                                     # the command line: the user's own files
    assert [p.name for p in shard_inputs([str(pages)])] == ["pages"] and len(_files([str(ref)])) == 2


def test_an_extract_run_on_a_folder_with_an_escaping_symlink_fails_before_reading(roots, tmp_path, prefect_api):
    from flows.extract import extract_flow

    outside = tmp_path / "outside.html"
    outside.write_text("<html><body><p>" + "private words " * 50 + "</p></body></html>")
    pages = roots / "pages"
    pages.mkdir()
    (pages / "leak.html").symlink_to(outside)
    with pytest.raises(PathNotAllowed, match="leak.html"):
        extract_flow([str(pages)], str(roots / "out"))
    assert not list((roots / "out").rglob("*.parquet"))
