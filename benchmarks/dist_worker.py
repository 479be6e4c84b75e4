"""Train S²FT on fixed rows in one process, under DDP or under FSDP2 (2 CPU processes, gloo); save what trained.

    python benchmarks/dist_worker.py MODEL_DIR OUT_DIR --strategy single|ddp|fsdp [--steps N | --epochs N]
        [--optimizer sgd|adamw] [--accumulate K] [--clip C] [--checkpoint] [--resume CKPT] [--adapter] [--merged]

Used by tests/test_fsdp.py and tools/bench_distributed.py. Every global batch holds the
same rows whatever the process count (ranks take rows r, r+2, ... in order), so the trained deltas must match
the single-process run. Writes OUT_DIR/deltas.safetensors (full deltas, gathered) and OUT_DIR/stats.json
(per-rank frozen/trainable bytes held locally, step times).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

from s2ft_lightning import AdapterCheckpoint, MergeAdapters, S2Config, S2FTModule
from s2ft_lightning.sharding import full

GLOBAL_BATCH, ROWS, LENGTH = 4, 16, 12


class FixedRows(L.LightningDataModule):
    def __init__(self, vocab: int, per_device: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (ROWS, LENGTH), generator=g)
        self.rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
        self.per_device = per_device

    def train_dataloader(self):
        # No shuffle: rank r gets rows r, r+2, ..., so every global batch holds the single-process batch's rows.
        sampler = DistributedSampler(self.rows, shuffle=False) if torch.distributed.is_initialized() else None
        return DataLoader(self.rows, batch_size=self.per_device, sampler=sampler, shuffle=False)


class StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self.t)


def local_bytes(module: torch.nn.Module, trainable: bool) -> int:
    """Bytes of (frozen or trainable) parameters this rank holds (its shard of a DTensor)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in module.parameters():
        if p.requires_grad == trainable:
            t = p.to_local() if isinstance(p, DTensor) else p
            total += t.numel() * t.element_size()
    return total


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("model_dir")
    a.add_argument("out")
    a.add_argument("--strategy", choices=("single", "ddp", "fsdp"), required=True)
    a.add_argument("--steps", type=int, default=3)
    a.add_argument("--epochs", type=int, default=None)
    a.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    a.add_argument("--accumulate", type=int, default=1)
    a.add_argument("--clip", type=float, default=None)
    a.add_argument("--checkpoint", action="store_true")
    a.add_argument("--resume", default=None)
    a.add_argument("--adapter", action="store_true")
    a.add_argument("--merged", action="store_true")
    a.add_argument("--rows-per-device", type=int, default=None)
    args = a.parse_args()
    out = Path(args.out)
    devices = 1 if args.strategy == "single" else 2
    L.seed_everything(0)
    opt = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.5),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    }[args.optimizer]
    module = S2FTModule(args.model_dir, s2=S2Config(o_ratio=0.25, d_ratio=0.1, seed=3), optimizer=opt)
    if args.strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp" if args.strategy == "ddp" else "auto"
    timer = StepTimes()
    callbacks: list = [timer]
    if args.checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=out / "ck", save_last=True, save_top_k=0))
    if args.adapter:
        callbacks.append(AdapterCheckpoint(out / "adapter"))
    if args.merged:
        callbacks.append(MergeAdapters(out / "merged"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        use_distributed_sampler=False,
        max_steps=-1 if args.epochs else args.steps,
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        logger=False,
        enable_checkpointing=args.checkpoint,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=callbacks,
    )
    per_device = args.rows_per_device or GLOBAL_BATCH // devices
    trainer.fit(module, datamodule=FixedRows(300, per_device), ckpt_path=args.resume)
    deltas = {n: full(p).detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    stats = {
        "rank": trainer.global_rank,
        "frozen_bytes_local": local_bytes(module, trainable=False),
        "trainable_bytes_local": local_bytes(module, trainable=True),
        "step_seconds": timer.times,
    }
    (out / f"stats_rank{trainer.global_rank}.json").write_text(json.dumps(stats))
    if trainer.is_global_zero:
        save_file(deltas, out / "deltas.safetensors")


if __name__ == "__main__":
    main()
