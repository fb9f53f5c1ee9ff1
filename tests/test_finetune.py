"""Fine-tuning: LoRA and prompt tuning train only what they add, exports reload to the same
numbers, and a real pretrained model (SmolLM2-135M, from GGUF) adapts to real text in a few CPU steps."""
from __future__ import annotations

import copy
import os
import re
import time

import pytest
import torch

from models.architectures import make_config
from tests.smollm import ROOT, shard, smollm2_gguf, tiny_shards, train_steps, write_docs  # noqa: F401

SEQ = 64


@pytest.fixture(scope="module")
def shards(prefect_api, tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("ft"))


def tiny_decoder(dm):
    from models.architectures import build_model

    dm.setup()
    torch.manual_seed(0)
    config = make_config("decoder", "tiny", dm.vocab_size, SEQ, {"eos": dm.eos_id, "pad": dm.pad_id})
    return build_model(config)


def datamodule(shards, seq_len=SEQ, batch_size=8):
    from models.data import ShardDataModule

    dm = ShardDataModule(str(shards), seq_len=seq_len, batch_size=batch_size, objective="causal", seed=0)
    dm.setup()
    return dm


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_only_trained(model, before: dict, is_added) -> list[str]:
    """Every parameter `is_added` names is trainable and changed; every other one is frozen and
    bitwise unchanged. Returns the added names."""
    added = []
    for n, p in model.named_parameters():
        if is_added(n):
            added.append(n)
            assert p.requires_grad, n
            assert not torch.equal(p.detach(), before[n]), f"{n} did not change"
        else:
            assert not p.requires_grad, n
            assert torch.equal(p.detach(), before[n]), f"base weight {n} changed"
    assert added
    return added


@pytest.fixture(scope="module")
def lora_trained(shards):
    from models.finetune import apply_method

    dm = datamodule(shards)
    base = tiny_decoder(dm)
    base_copy = copy.deepcopy(base)
    model, report = apply_method(base, "lora", lora_r=2)
    before = snapshot(model)
    train_steps(model, "causal", dm, steps=3, lr=1e-2)
    return model, report, before, base_copy, dm


def test_lora_trains_only_the_adapters(lora_trained):
    model, report, before, _, _ = lora_trained
    added = assert_only_trained(model, before, lambda n: ".lora_A." in n or ".lora_B." in n)
    # 2 layers x 7 projections (q k v o gate up down) x (A, B)
    assert len(added) == 2 * 7 * 2
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["method"] == "lora" and report["trainable_params"] == trainable
    assert report["trainable_fraction"] == pytest.approx(trainable / report["total_params"], abs=1e-6)
    assert report["trainable_fraction"] < 0.05
    print(f"\ntiny decoder LoRA r=2: {report}")


def test_lora_export_merges_and_reloads_to_the_same_logits(lora_trained, shards, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.finetune import export_finetuned

    model, _, _, base_copy, dm = lora_trained
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"]).logits
    out = export_finetuned(model, "lora", shards / "tokenizer", tmp_path / "hf")
    assert out["hf"] == str(tmp_path / "hf") and out["adapter"] == str(tmp_path / "hf-adapter")
    assert not list(tmp_path.glob(".*")), "temporary folders left behind"
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the adapter alone, applied to the original base, gives the same model
    with torch.no_grad():
        again = PeftModel.from_pretrained(base_copy, str(tmp_path / "hf-adapter")).eval()(
            input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(again, want, atol=1e-4, rtol=0)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert len(tok) == dm.vocab_size


def test_prompt_tuning_trains_only_the_prompt_and_exports_base_plus_adapter(shards, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from models.finetune import apply_method, export_finetuned
    from models.module import LMModule

    dm = datamodule(shards)
    model, report = apply_method(tiny_decoder(dm), "prompt", prompt_tokens=8)
    before = snapshot(model)
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        loss0 = float(LMModule(model, "causal").loss(batch))
    train_steps(model, "causal", dm, steps=3, lr=1e-1)
    added = assert_only_trained(model, before, lambda n: n.startswith("prompt_encoder."))
    assert [tuple(before[n].shape) for n in added] == [(8, 64)]
    assert report["trainable_params"] == 8 * 64 and report["trainable_fraction"] < 0.01
    print(f"\ntiny decoder prompt tuning, 8 tokens: {report}")
    # the virtual tokens are skipped by the loss: logits cover 8 + SEQ positions, the loss the last SEQ
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        assert logits.shape[1] == 8 + SEQ
        assert float(LMModule(model, "causal").loss(batch)) != loss0

    out = export_finetuned(model, "prompt", shards / "tokenizer", tmp_path / "hf")
    base = AutoModelForCausalLM.from_pretrained(out["hf"])
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, out["adapter"]).eval()(input_ids=batch["input_ids"]).logits
        auto = AutoPeftModelForCausalLM.from_pretrained(out["adapter"]).eval()(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(auto, logits, atol=1e-5, rtol=0)


def test_prompt_init_text_starts_from_the_texts_embeddings(shards):
    from transformers import AutoTokenizer

    from models.finetune import apply_method

    dm = datamodule(shards)
    tok = AutoTokenizer.from_pretrained(str(shards / "tokenizer"))
    model, _ = apply_method(tiny_decoder(dm), "prompt", prompt_tokens=6, prompt_init_text="United States",
                            tokenizer=tok)
    ids = tok("United States", add_special_tokens=False)["input_ids"]
    ids = (ids * 6)[:6]
    emb = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(emb, model.word_embeddings.weight[ids])


def test_qlora_without_cuda_says_what_it_needs(monkeypatch, shards):
    from models.finetune import apply_method

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="QLoRA needs a CUDA GPU and bitsandbytes.*use method 'lora'"):
        apply_method(tiny_decoder(datamodule(shards)), "qlora")


def test_bad_bases_and_methods_are_named(tmp_path):
    from models.finetune import apply_method, load_base

    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_base(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: neither a Hugging Face model folder"):
        load_base(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt: not a .gguf"):
        load_base(tmp_path / "notes.txt")
    (tmp_path / "two").mkdir()
    for n in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / n).write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        load_base(tmp_path / "two")
    with pytest.raises(ValueError, match="method must be one of"):
        apply_method(torch.nn.Linear(2, 2), "adapters")


def test_prepare_tokenizer_writes_the_bases_tokenizer_for_sharding(shards, tmp_path):
    import shutil

    from models.finetune import load_base, prepare_tokenizer
    from tasks.tokenizer import load_user_tokenizer

    base = tmp_path / "base"
    tiny_decoder(datamodule(shards)).save_pretrained(str(base))
    with pytest.raises(FileNotFoundError, match="base has no tokenizer files"):
        prepare_tokenizer(base, tmp_path / "tok")
    shutil.copytree(shards / "tokenizer", base, dirs_exist_ok=True)
    assert load_base(base)[1] is not None
    out = prepare_tokenizer(base, tmp_path / "tok")
    text = "The President took the oath of office on the steps of the Capitol."
    ids = load_user_tokenizer(shards / "tokenizer")(text)["input_ids"]
    assert load_user_tokenizer(out)(text)["input_ids"] == ids


def test_train_run_finetunes_our_own_export_with_lora(shards, tmp_path):
    """The wiring in models.train.run: base = a folder we exported, method lora, export merged."""
    from transformers import AutoModelForCausalLM

    from models.train import run

    base = tiny_decoder(datamodule(shards))
    base.save_pretrained(str(tmp_path / "base"))
    spec = {"data_dir": str(shards), "out_dir": str(tmp_path / "run"),
            "train": {"seq_len": SEQ, "batch_size": 4, "max_steps": 3, "lr": 1e-2, "val_every": 3, "val_batches": 2,
                      "checkpoint_every": 3, "accelerator": "cpu"},
            "finetune": {"base": str(tmp_path / "base"), "method": "lora", "lora_r": 2}}
    result = run(spec)
    ft = result.finetune
    assert ft.method == "lora" and 0 < ft.trainable_fraction < 0.05
    assert result.export_paths["adapter"] and result.export == result.export_paths["hf"]
    merged = AutoModelForCausalLM.from_pretrained(result.export)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed and all(n.endswith("_proj.weight") for n in changed)   # only the adapted projections


# ----------------------------------------------------------------------------------------------
# a real pretrained model

def wikitext_raw(max_chars: int) -> list[str]:
    """WikiText-2 articles as the data set ships them (' @-@ ', '<unk>', spaced punctuation,
    ' = = Section = = '): real Wikipedia text in a house style a web-trained model has not seen."""
    raw = (ROOT / "sample" / "curation" / "reference" / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    parts = re.split(r"\n(?= = [^=\n]+ = \n)", raw)
    docs, size = [], 0
    for p in parts:
        if p.strip() and size < max_chars:
            docs.append(p.strip("\n"))
            size += len(p)
    return docs


@pytest.fixture
def one_thread():
    """The test box's 2 cores are shared with other jobs: there, 2 intra-op threads made a SmolLM2
    step 2-5x slower than 1 thread (OpenMP threads wait on each other while the other jobs run).
    REFINERY_TEST_THREADS overrides it on a dedicated machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("REFINERY_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(n)


def test_smollm2_lora_lowers_validation_loss_on_domain_text(prefect_api, smollm2_gguf, one_thread, tmp_path):
    from models.finetune import apply_method, load_base, save_tokenizer
    from models.quantize import eval_loss, take_batches

    t = {}
    t0 = time.perf_counter()
    model, tok = load_base(smollm2_gguf.parent)          # a folder holding one .gguf
    t["load"] = time.perf_counter() - t0
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    # dense and unmarked: save_pretrained refuses a model still flagged as GGUF-quantized
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    tok_dir = save_tokenizer(tok, tmp_path / "tokenizer")

    t0 = time.perf_counter()
    docs = wikitext_raw(300_000)
    write_docs(docs, tmp_path / "curated", "wikitext")
    data = shard(tmp_path / "curated", tmp_path / "shards", tokenizer_path=str(tok_dir), val_fraction=0.15)
    dm = datamodule(data, seq_len=128, batch_size=4)
    assert dm.vocab_size == model.config.vocab_size and dm.eos_id == tok.eos_token_id
    val = take_batches(dm.val_dataloader(), 3)
    assert len(val) == 3
    t["shard"] = time.perf_counter() - t0

    model, report = apply_method(model, "lora")
    assert report["trainable_fraction"] < 0.05
    t0 = time.perf_counter()
    before = eval_loss(model, "causal", val)
    t["eval"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_steps(model, "causal", dm, steps=3, lr=2e-3, seq_len=128)
    t["train_3_steps"] = time.perf_counter() - t0
    after = eval_loss(model, "causal", val)
    print(f"\nSmolLM2-135M LoRA r=8 on raw WikiText ({sum(map(len, docs)) // 1000} KB, "
          f"{dm.manifest.split('train').tokens} train tokens): {report}\n"
          f"val loss {before:.4f} -> {after:.4f} on {3 * 4 * 128} tokens; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    assert 1.0 < before < 6.0           # a pretrained model: far below log(49152) = 10.8
    assert after < before - 0.1
