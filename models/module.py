"""The LightningModule: one Hugging Face model, one objective, AdamW with warmup + cosine.

The batches come from `models.data.ShardDataModule`: causal batches carry labels already shifted
(packed sequences), so the loss is computed here from the logits; MLM and span batches go to the
model with their labels (T5 shifts labels into decoder inputs itself).
"""
from __future__ import annotations

import math
import time

import lightning as L
import torch
import torch.nn.functional as F

from models.architectures import flops_per_token, n_params

IGNORE = -100


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from ~0 to 1, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LMModule(L.LightningModule):
    def __init__(self, model, objective: str, lr: float = 3e-4, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 0, max_steps: int = 1000,
                 min_lr_ratio: float = 0.1, seq_len: int = 0, peak_flops: float | None = None,
                 activation_checkpointing: bool = False, fsdp: bool = False, nan_policy: str = "stop",
                 compile: bool = False, base_identity: dict | None = None):
        super().__init__()
        self.model = model
        self.objective = objective
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        self.n_params = n_params(model)
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.flops_per_token = flops_per_token(model.config, self.n_params, seq_len) if seq_len else 0.0
        self.peak_flops = peak_flops
        self.fsdp, self.nan_policy = fsdp, nan_policy
        # the compiled wrapper is kept outside the module tree: checkpoints and exports hold the plain
        # model's parameter names, so a compiled run resumes uncompiled and vice versa
        object.__setattr__(self, "_forward", torch.compile(model) if compile else model)
        if activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.local_params = self.n_params
        self.tokens_seen = 0        # input tokens trained on, all ranks (saved in checkpoints)
        self.skipped_batches = 0
        # a LoRA or prompt-tuning run checkpoints only what trains (MBs, not the frozen base's GBs) and
        # names the base by path and hash, from which a resume rebuilds the rest
        self.base_identity = base_identity
        self.partial_checkpoints = base_identity is not None and self.n_trainable < self.n_params
        self._t_last: float | None = None

    # -- FSDP2: shard each block, then the root (ModelParallelStrategy calls this once per rank)
    def configure_model(self) -> None:
        if not self.fsdp or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in blocks(self.model):
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self._sharded = True
        # what this rank holds: about 1/world of the weights (the evidence that they are sharded)
        self.local_params = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                for p in self.model.parameters())

    def loss(self, batch: dict) -> torch.Tensor:
        if self.objective == "causal":
            labels = batch["labels"]
            # prompt tuning prepends virtual tokens: score only the positions of real tokens
            logits = self._forward(input_ids=batch["input_ids"]).logits[:, -labels.size(1):]
            return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=IGNORE)
        return self._forward(**batch).loss

    def training_step(self, batch: dict, batch_idx: int):
        loss = self.loss(batch)
        n = batch["input_ids"].numel() * self.trainer.world_size
        if not torch.isfinite(loss):
            # never train through a NaN/inf: stop naming the step, or skip the batch if configured
            if self.nan_policy == "stop":
                raise FloatingPointError(f"loss is {loss.item()} at step {self.global_step}: stopping "
                                         "(train.nan_policy=skip skips such batches)")
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches), rank_zero_only=True)
            return None
        self.tokens_seen += n
        self.log("train/loss", loss.detach(), prog_bar=True, sync_dist=False)
        self.log("train/tokens", float(self.tokens_seen), rank_zero_only=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], rank_zero_only=True)
        now = time.perf_counter()
        if self._t_last is not None:
            tps = n / max(now - self._t_last, 1e-9)
            self.log("train/tokens_per_s", tps, rank_zero_only=True)
            if self.peak_flops:
                self.log("train/mfu", tps * self.flops_per_token / (self.peak_flops * self.trainer.world_size),
                         rank_zero_only=True)
        self._t_last = now
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        loss = self.loss(batch)
        self.log("val/loss", loss, sync_dist=True, prog_bar=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        val = self.trainer.callback_metrics.get("val/loss")
        if val is not None:
            self.log("val/ppl", torch.exp(val.float().clamp(max=30)), sync_dist=False)
        self._t_last = None  # validation time is not training throughput

    def configure_optimizers(self):
        # no weight decay on norms and biases (GPT-3, Llama): only matrices of 2+ dimensions decay
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=self.lr, betas=self.betas, eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.warmup_steps, self.max_steps, self.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["refinery"] = {"tokens_seen": self.tokens_seen, "skipped_batches": self.skipped_batches}
        if self.partial_checkpoints:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
            checkpoint["refinery"]["base"] = self.base_identity

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("refinery", {})
        self.tokens_seen = state.get("tokens_seen", 0)
        self.skipped_batches = state.get("skipped_batches", 0)
        if "base" in state:      # a partial checkpoint: the frozen weights come from the base, which must match
            saved, ours = state["base"], self.base_identity or {}
            if saved.get("sha256") != ours.get("sha256"):
                raise ValueError(f"this checkpoint trained adapters on the base {saved.get('path')} "
                                 f"(sha256 {str(saved.get('sha256'))[:12]}), not on {ours.get('path')} "
                                 f"(sha256 {str(ours.get('sha256'))[:12]}): resume with that base, or start over")
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            missing = sorted(trainable - set(checkpoint["state_dict"]))
            if missing:
                raise ValueError(f"the checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]}): "
                                 "it was made with other fine-tuning settings")
            self.strict_loading = False     # the frozen rest stays as loaded from the base


def blocks(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a Llama, BERT or T5 model (the FSDP wrapping unit)."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__ in ("LlamaDecoderLayer", "BertLayer", "T5Block", "RobertaLayer"):
            found.append(module)
    return found
