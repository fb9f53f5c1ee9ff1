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


def test_our_saved_folder_is_what_transformers_writes(tmp_path, sample_dir):
    """save_hf writes the Hugging Face folder itself (transformers would pull torch into the run):
    it must be what `PreTrainedTokenizerFast.save_pretrained` writes, and load and encode the same."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from core.shard_format import EOS, MASK, PAD, sentinel
    from tasks.tokenizer import native_special_ids, load_trained, save_hf, special_ids, train_bpe

    pages = sorted((sample_dir / "curation" / "reference" / "inaugural").glob("*.txt"))[:6]
    texts = [p.read_text(encoding="utf-8") for p in pages]
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    save_hf(train_bpe(texts, 700, 2, 4), ours, 4)
    PreTrainedTokenizerFast(tokenizer_object=train_bpe(texts, 700, 2, 4), eos_token=EOS, pad_token=PAD,
                            mask_token=MASK, additional_special_tokens=[sentinel(i) for i in range(4)],
                            clean_up_tokenization_spaces=False, model_max_length=1 << 30).save_pretrained(str(theirs))
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for f in ours.iterdir():
        assert json.loads(f.read_text()) == json.loads((theirs / f.name).read_text()), f.name
    hf = AutoTokenizer.from_pretrained(str(ours))
    sample = texts[0][:2000] + " ünïcödé 🦀 <|endoftext|>"
    assert hf(sample, add_special_tokens=False)["input_ids"] == load_trained(ours).encode(sample).ids
    assert native_special_ids(load_trained(ours)) == special_ids(hf)
    assert len(hf) == load_trained(ours).get_vocab_size(with_added_tokens=True)
