"""Train S²FT for a few SGD steps on fixed-length rows and save the blocks; run with 1 or 2 CPU processes.

    python tests/ddp_worker.py MODEL_DIR OUT_FILE DEVICES

Used by tests/test_ddp.py: with 2 processes (DDP, gloo) each rank sees half of every global batch, so the
blocks must match the single-process run with the same global batch.
"""

import sys

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

from s2ft_lightning import S2Config, S2FTModule

GLOBAL_BATCH, ROWS, LENGTH, STEPS = 4, 16, 12, 3


class FixedRows(L.LightningDataModule):
    def __init__(self, vocab: int, per_device: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (ROWS, LENGTH), generator=g)
        self.rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
        self.per_device = per_device

    def train_dataloader(self):
        # No shuffle: rank r gets rows r, r+2, ..., so every global batch holds the same rows as the
        # single-process batch.
        sampler = None
        if torch.distributed.is_initialized():
            sampler = DistributedSampler(self.rows, shuffle=False)
        return DataLoader(self.rows, batch_size=self.per_device, sampler=sampler, shuffle=False)


def main() -> None:
    model_dir, out, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    L.seed_everything(0)
    module = S2FTModule(
        model_dir, s2=S2Config(o_ratio=0.25, d_ratio=0.1, seed=3), optimizer=lambda p: torch.optim.SGD(p, lr=0.5)
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        use_distributed_sampler=False,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    vocab = 300
    trainer.fit(module, datamodule=FixedRows(vocab, GLOBAL_BATCH // devices))
    if trainer.is_global_zero:
        blocks = {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}
        save_file(blocks, out)


if __name__ == "__main__":
    main()
