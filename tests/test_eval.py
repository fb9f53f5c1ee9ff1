"""`refinery eval`: bits per byte that agree with a direct transformers computation, for our
exports, LoRA adapters and every data format; models without a causal likelihood are refused."""
from __future__ import annotations

import json
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.smollm import tiny_shards, train_steps

SEQ = 64


@pytest.fixture(scope="module")
def shards(prefect_api, tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def export(shards, tmp_path_factory):
    """A tiny decoder trained a few real steps, saved as this project exports: model + shards' tokenizer."""
    from models.architectures import build_model, make_config
    from models.data import ShardDataModule

    dm = ShardDataModule(str(shards), seq_len=SEQ, batch_size=8, objective="causal", seed=0)
    dm.setup()
    torch.manual_seed(0)
    model = build_model(make_config("decoder", "tiny", dm.vocab_size, SEQ, {"eos": dm.eos_id, "pad": dm.pad_id}))
    train_steps(model, "causal", dm, steps=4, lr=3e-3)
    out = tmp_path_factory.mktemp("export") / "hf"
    model.save_pretrained(str(out))
    for f in (shards / "tokenizer").iterdir():
        shutil.copy2(f, out / f.name)
    return out, model, dm


@pytest.fixture(scope="module")
def texts(shards) -> list[str]:
    from core.eval_data import load_eval_set

    return load_eval_set(shards / "val").texts[:4]


def direct_bpb(model, tok, texts: list[str], context: int | None = None) -> tuple[float, int]:
    """Independent of models/evaluate.py: transformers' own mean loss with labels=input_ids, per
    document (or per window of `context`), after the EOS token a packed document follows."""
    nll, tokens, nbytes = 0.0, 0, 0
    for t in texts:
        seq = [tok.eos_token_id] + tok(t, add_special_tokens=False)["input_ids"]
        step = context or len(seq)
        for s in range(0, len(seq) - 1, step):
            w = torch.tensor([seq[s:s + step + 1]])
            with torch.no_grad():
                loss = model(input_ids=w, labels=w).loss.item()
            nll += loss * (w.shape[1] - 1)
            tokens += w.shape[1] - 1
        nbytes += len(t.encode())
    return nll / math.log(2) / nbytes, tokens


def test_bits_per_byte_agree_with_a_direct_transformers_computation(export, texts):
    from transformers import AutoTokenizer

    from models.evaluate import load_model, score_texts

    path, model, _ = export
    tok = AutoTokenizer.from_pretrained(str(path))
    lm = load_model(path)
    whole = score_texts(lm, texts, context=100_000, batch_size=3)
    ref, ref_tokens = direct_bpb(model.eval(), tok, texts)
    print(f"\nbpb {whole.bits_per_byte:.6f} direct {ref:.6f} tokens {whole.tokens} bytes {whole.bytes}")
    assert whole.bits_per_byte == pytest.approx(ref, rel=1e-4)
    assert whole.tokens == ref_tokens and whole.bytes == sum(len(t.encode()) for t in texts)
    assert whole.documents == len(texts)
    assert whole.loss == pytest.approx(whole.bits_per_byte * math.log(2) * whole.bytes / whole.tokens, rel=1e-9)
    assert whole.perplexity == pytest.approx(math.exp(whole.loss))
    assert 1.5 < whole.bits_per_byte < 8      # a few steps of training: well below a uniform guess's 11 bits/token

    # non-overlapping windows: each window is scored on its own; the batch size changes nothing
    win = score_texts(lm, texts, context=32, batch_size=1)
    assert win.bits_per_byte == pytest.approx(direct_bpb(model, tok, texts, context=32)[0], rel=1e-4)
    assert win.tokens == whole.tokens and win.bits_per_byte > whole.bits_per_byte   # less context, worse
    assert score_texts(lm, texts, context=32, batch_size=7).bits_per_byte == pytest.approx(win.bits_per_byte, rel=1e-6)


def test_every_data_format_scores_the_same_documents(export, shards, texts, tmp_path):
    from models.evaluate import evaluate

    path = export[0]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    (tmp_path / "docs").mkdir()
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs" / "part-0.parquet")
    (tmp_path / "one.txt").write_text(texts[0])
    result = evaluate(path, [tmp_path / "set.jsonl", tmp_path / "docs", tmp_path / "one.txt", shards / "val"],
                      context=64, batch_size=4, show_progress=False)
    ds = result["datasets"]
    assert list(ds) == ["set", "docs", "one", "shards-val"]
    assert ds["set"] == {**ds["docs"], "path": ds["set"]["path"], "seconds": ds["set"]["seconds"]}
    assert ds["one"]["documents"] == 1 and ds["one"]["bytes"] == len(texts[0].encode())
    # the shard folder decodes its val split with its own tokenizer: the same text as written
    assert ds["shards-val"]["documents"] >= len(texts)
    for name in ds:
        assert set(ds[name]) >= {"bits_per_byte", "loss", "perplexity", "tokens", "bytes", "documents"}


def test_lora_adapter_loads_on_its_base_and_evaluates(export, texts, tmp_path):
    from transformers import AutoModelForCausalLM

    from models.evaluate import evaluate
    from models.finetune import apply_method

    path, _, dm = export
    base = AutoModelForCausalLM.from_pretrained(str(path))
    model, _ = apply_method(base, "lora", lora_r=4)
    train_steps(model, "causal", dm, steps=3, lr=5e-2)
    model.save_pretrained(str(tmp_path / "adapter"))       # adapter_config.json names `path` as its base
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    merged = model.merge_and_unload()
    merged.save_pretrained(str(tmp_path / "merged"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(path / f, tmp_path / "merged" / f)
    (tmp_path / "set.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    kw = {"context": 64, "batch_size": 2, "show_progress": False}
    via_adapter = evaluate(tmp_path / "adapter", [tmp_path / "set.jsonl"], base=path, **kw)["datasets"]["set"]
    via_merged = evaluate(tmp_path / "merged", [tmp_path / "set.jsonl"], **kw)["datasets"]["set"]
    of_base = evaluate(path, [tmp_path / "set.jsonl"], **kw)["datasets"]["set"]
    assert via_adapter["bits_per_byte"] == pytest.approx(via_merged["bits_per_byte"], rel=1e-5)
    assert abs(via_adapter["bits_per_byte"] - of_base["bits_per_byte"]) > 1e-3     # the adapter does something

    # an adapter whose recorded base moved: a clear message, and --base fixes it
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="pass --base"):
        evaluate(tmp_path / "adapter", [tmp_path / "set.jsonl"], **kw)


def test_cli_writes_eval_json_and_refuses_what_it_cannot_score(export, texts, tmp_path, capsys):
    from flows.cli import main
    from models.architectures import build_model, make_config

    path = export[0]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:2]))
    (tmp_path / "prose.txt").write_text(texts[2])
    rc = main(["eval", "--model", str(path), "--data", str(tmp_path / "held.jsonl"), str(tmp_path / "prose.txt"),
               "--out", str(tmp_path / "ev"), "--context", "128", "--batch-size", "2", "--no-progress"])
    assert rc == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["model"] == str(path) and set(result["datasets"]) == {"held", "prose"}
    assert "bits/byte" in capsys.readouterr().out

    # a masked LM has no likelihood of a text: refused by name, no number
    enc = build_model(make_config("encoder", "tiny", 2048, SEQ, {"eos": 0, "pad": 1, "mask": 2}))
    enc.save_pretrained(str(tmp_path / "bert"))
    rc = main(["eval", "--model", str(tmp_path / "bert"), "--data", str(tmp_path / "held.jsonl"),
               "--out", str(tmp_path / "ev2"), "--no-progress"])
    assert rc == 2 and "needs a causal (decoder-only) LM" in capsys.readouterr().err
    assert not (tmp_path / "ev2" / "eval.json").exists()
    # bad data fails before the model is loaded, naming the file and line
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    assert main(["eval", "--model", str(path), "--data", str(tmp_path / "bad.jsonl"), "--no-progress"]) == 2
    assert 'bad.jsonl:1: no "text" string field' in capsys.readouterr().err


def test_finetune_flow_ends_with_base_and_tuned_bits_per_byte(export, shards, texts, tmp_path, prefect_api):
    from core.config import RefineryConfig
    from flows.train import finetune_flow

    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:2]))
    cfg = RefineryConfig.model_validate({
        "train": {"seq_len": SEQ, "batch_size": 4, "max_steps": 6, "lr": 2e-2, "val_every": 6, "val_batches": 2,
                  "checkpoint_every": 6, "accelerator": "cpu"},
        "finetune": {"lora_r": 4}, "eval": {"data": [str(tmp_path / "held.jsonl")], "context": 64}})
    result = finetune_flow(str(export[0]), str(shards), str(tmp_path / "run"), "lora", cfg)
    rows = {r["dataset"]: r for r in result.eval["rows"]}
    assert set(rows) == {"shards-val", "held"}
    base = json.loads((tmp_path / "run" / "eval-base.json").read_text())
    tuned = json.loads((tmp_path / "run" / "eval.json").read_text())
    for name, r in rows.items():
        assert r["base_bits_per_byte"] == round(base["datasets"][name]["bits_per_byte"], 4)
        assert r["bits_per_byte"] == round(tuned["datasets"][name]["bits_per_byte"], 4)
        assert r["change_pct"] == pytest.approx(100 * (r["bits_per_byte"] / r["base_bits_per_byte"] - 1), abs=0.05)
    # the base is scored as it was loaded for training, the tuned model from its merged export
    assert base["model"] == str(export[0]) and tuned["model"].endswith("hf")
    assert tuned["datasets"]["shards-val"]["bits_per_byte"] != base["datasets"]["shards-val"]["bits_per_byte"]


def test_a_learned_position_table_caps_the_window(export, texts, tmp_path):
    """GPT-2-style models index a position table: a longer window would be an IndexError, not a score."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.evaluate import evaluate

    path, _, dm = export
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=dm.vocab_size, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                      bos_token_id=dm.eos_id, eos_token_id=dm.eos_id))
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(path / f, tmp_path / "gpt2" / f)
    (tmp_path / "set.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")
    result = evaluate(tmp_path / "gpt2", [tmp_path / "set.jsonl"], context=1024, show_progress=False)
    assert result["context"] == 32 and result["datasets"]["set"]["tokens"] > 32
