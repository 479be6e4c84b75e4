"""FSDP2 sharding of an S²FT-prepared model (Lightning's `ModelParallelStrategy`), and gathering what is small.

Surgery needs whole weights, so a model is prepared first and sharded after: `shard` calls ``fully_shard`` on
each decoder layer, then on the model (embeddings, norms, head). The S2 layers shard like any module: the frozen
base and the deltas become DTensors; the delta forward never writes the base, so nothing has to be synced into
a sharded weight. `full` gathers one tensor (used for the deltas and the base values under them when an adapter
is extracted); the whole model is never gathered on one rank.
"""

from __future__ import annotations

import torch
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2 / tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank: ``full_tensor()`` of a DTensor (a collective: call it on every rank)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of layers to shard")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def shard(model: nn.Module, mesh, *, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every decoder layer, then the model, over the 1-D data-parallel ``mesh`` (in place)."""
    from torch.distributed.fsdp import fully_shard

    if getattr(mesh, "ndim", 1) != 1:
        raise ValueError(
            f"S²FT shards over one data-parallel mesh dimension; got a {mesh.ndim}-D mesh (tensor parallelism is "
            "not supported): use ModelParallelStrategy(tensor_parallel_size=1)"
        )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def data_parallel_mesh(device_mesh):
    """The data-parallel dimension of Lightning's device mesh, refusing tensor parallelism by name."""
    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "tensor parallelism is not supported with S²FT (the trained blocks would be split across ranks); "
            "use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)"
        )
    return device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
