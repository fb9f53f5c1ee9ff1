"""The tokenizer report's general BPE is trained once per (bundled text, size, code), then read from
the cache folder: it depends on nothing a run changes."""
from __future__ import annotations


def test_general_tokenizer_is_trained_once_and_read_back(tmp_path, monkeypatch):
    from tasks.tokenizer import general_tokenizer

    monkeypatch.setenv("REFINERY_CACHE", str(tmp_path))
    first = general_tokenizer(1024, 4)
    cached = list((tmp_path / "general-tokenizers").glob("bpe-1024-*.json"))
    assert len(cached) == 1
    again = general_tokenizer(1024, 4)
    assert again.to_str() == first.to_str()
    other = general_tokenizer(2048, 4)                  # another size is another entry
    assert other.get_vocab_size() == 2048 and len(list((tmp_path / "general-tokenizers").iterdir())) == 2
    cached[0].write_text("{not json")                   # a damaged entry is trained again, not trusted
    assert general_tokenizer(1024, 4).to_str() == first.to_str()


def test_an_unwritable_cache_costs_time_not_the_report(tmp_path, monkeypatch):
    from tasks.tokenizer import general_tokenizer

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("REFINERY_CACHE", str(blocker))  # a file where the folder should be
    assert general_tokenizer(1024, 4).get_vocab_size() == 1024
