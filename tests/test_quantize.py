"""int8 weight quantization of a model trained here on real shards: ~3.8x smaller Linear weights,
a saved folder that reloads to the very same outputs, and a perplexity cost that stays small."""
from __future__ import annotations

import copy

import pytest
import torch

from models.architectures import build_model, make_config
from tests.smollm import tiny_shards, train_steps

SEQ = 64
VAL_BATCHES = 20


@pytest.fixture(scope="module")
def trained(prefect_api, tmp_path_factory):
    """A tiny decoder trained 100 steps on real text: weights with real structure, not init noise."""
    from models.data import ShardDataModule

    shards = tiny_shards(tmp_path_factory.mktemp("quant"))
    dm = ShardDataModule(str(shards), seq_len=SEQ, batch_size=8, objective="causal", seed=0)
    dm.setup()
    torch.manual_seed(0)
    model = build_model(make_config("decoder", "tiny", dm.vocab_size, SEQ, {"eos": dm.eos_id, "pad": dm.pad_id}))
    train_steps(model, "causal", dm, steps=100, lr=1e-2, seq_len=SEQ)
    return model, dm, shards


def test_rows_quantize_within_half_a_step():
    from models.quantize import quantize_rows

    torch.manual_seed(0)
    w = torch.randn(16, 32) * torch.logspace(-3, 1, 16)[:, None]   # rows of very different ranges
    w[3] = 0.0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.all((w - q.float() * scale[:, None]).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.equal(q[3], torch.zeros(32, dtype=torch.int8))
    assert torch.equal(q.abs().amax(dim=1)[[i for i in range(16) if i != 3]], torch.full((15,), 127, dtype=torch.int8))


def _tensor_bytes(path, keys) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), "pt") as f:
        for k in keys:
            t = f.get_slice(k)
            n = 1
            for d in t.get_shape():
                n *= d
            total += n * {"F32": 4, "I8": 1, "BF16": 2, "F16": 2}[t.get_dtype()]
    return total


def test_int8_export_is_smaller_reloads_identically_and_keeps_perplexity(trained, tmp_path):
    from transformers import AutoTokenizer

    from models.quantize import (Int8Linear, int8_modules, load_quantized, quantization_report, quantize_int8,
                                 save_quantized)

    model, dm, shards = trained
    model.save_pretrained(str(tmp_path / "float"))
    q, rep = quantize_int8(copy.deepcopy(model))
    save_quantized(q, tmp_path / "int8", tokenizer_dir=shards / "tokenizer")
    names = int8_modules(q)
    assert len(names) == rep["quantized"] == 2 * 7            # 2 layers x (q k v o gate up down)
    # the tied LM head: left float and still the embedding matrix itself
    assert "lm_head" in rep["skipped"] and type(q.lm_head) is torch.nn.Linear
    assert q.lm_head.weight is q.model.embed_tokens.weight

    # bytes of the Linear weights as stored in the two safetensors files
    before = _tensor_bytes(tmp_path / "float" / "model.safetensors", [f"{n}.weight" for n in names])
    after = _tensor_bytes(tmp_path / "int8" / "model.safetensors",
                          [f"{n}.{s}" for n in names for s in ("weight_int8", "weight_scale")])
    assert (before, after) == (rep["linear_weight_bytes_before"], rep["linear_weight_bytes_after"])
    # 4 bytes -> 1 byte per weight plus one fp32 scale per row: 3.76x for 64-wide rows, 3.94x for 256
    assert before / after >= 3.7

    # the saved folder rebuilds the same model: same int8, same scales, same float ops
    r = load_quantized(tmp_path / "int8")
    assert int8_modules(r) == names and all(isinstance(r.get_submodule(n), Int8Linear) for n in names)
    assert r.lm_head.weight is r.model.embed_tokens.weight
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        assert torch.equal(r(input_ids=batch["input_ids"]).logits, q(input_ids=batch["input_ids"]).logits)
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "int8"))) == dm.vocab_size

    report = quantization_report(model, q, dm.val_dataloader(), "causal", max_batches=VAL_BATCHES,
                                 float_dir=tmp_path / "float", quantized_dir=tmp_path / "int8")
    print(f"\nint8 (tiny decoder, 100 steps): Linear weights {before} -> {after} bytes ({before / after:.2f}x); "
          f"weights file {report['weights_bytes_before']} -> {report['weights_bytes_after']} "
          f"({report['weights_bytes_before'] / report['weights_bytes_after']:.2f}x, the float tied embedding "
          f"is half of it); in memory {report['memory_bytes_before']} -> {report['memory_bytes_after']}; "
          f"val ppl {report['val_ppl_before']} -> {report['val_ppl_after']} ({100 * report['ppl_change']:+.3f}%) "
          f"on {report['val_tokens']} tokens")
    assert report["val_batches"] == VAL_BATCHES and report["weights_bytes_after"] < report["weights_bytes_before"]
    assert 1.0 < report["val_ppl_before"] < 2048
    # measured on this model: int8 per row +0.006% (per tensor +0.006%: this small model has no outlier
    # rows yet), the same code at int4 (7 levels) +0.19%; SmolLM2-135M int8 -0.12% on its val text.
    # 0.1% is 16x the int8 figure (all of it deterministic: fixed seed, same batches) and fails a
    # model quantized as coarsely as int4, let alone a wrong or missing scale
    assert abs(report["ppl_change"]) < 0.001


@pytest.mark.parametrize("arch", ["encoder", "encoder-decoder"])
def test_other_families_quantize_and_reload(arch, tmp_path):
    """BERT (tied MLM decoder, biases) and T5 (tied head, reads `wo.weight` in forward) too."""
    from models.quantize import int8_modules, load_quantized, quantize_int8, save_quantized

    torch.manual_seed(0)
    model = build_model(make_config(arch, "tiny", 512, 32, {"eos": 0, "pad": 1, "mask": 2})).eval()
    q, rep = quantize_int8(copy.deepcopy(model))
    assert rep["quantized"] > 0 and len(rep["skipped"]) == 1          # the tied head
    save_quantized(q, tmp_path / "int8")
    r = load_quantized(tmp_path / "int8")
    assert int8_modules(r) == int8_modules(q)
    x = torch.randint(3, 512, (2, 16))
    kw = {"input_ids": x, "decoder_input_ids": x} if arch == "encoder-decoder" else {"input_ids": x}
    with torch.no_grad():
        want, got, ref = q(**kw).logits, r(**kw).logits, model(**kw).logits
    assert torch.equal(got, want)
    assert (want - ref).abs().max() < 0.1 * ref.abs().max()


def test_quantize_folder_from_an_export_with_shards(trained, tmp_path):
    """The one-call path a CLI wraps: an HF export (model + tokenizer) -> an int8 folder + report."""
    import shutil

    from transformers import AutoTokenizer

    from models.quantize import load_quantized, quantize_folder

    model, dm, shards = trained
    model.save_pretrained(str(tmp_path / "hf"))
    shutil.copytree(shards / "tokenizer", tmp_path / "hf", dirs_exist_ok=True)
    out = quantize_folder(tmp_path / "hf", tmp_path / "int8", data_dir=shards, seq_len=SEQ, batch_size=8,
                          max_batches=4)
    assert out["quantize"]["quantized"] == 14 and out["report"]["val_batches"] == 4
    assert abs(out["report"]["ppl_change"]) < 0.001
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "int8"))) == dm.vocab_size
    assert sorted(p.name for p in (tmp_path / "int8").glob("*.safetensors")) == ["model.safetensors"]
    load_quantized(tmp_path / "int8")
