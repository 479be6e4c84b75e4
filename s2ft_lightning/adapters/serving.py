"""Multi-adapter batched serving: every batch row runs its own S²FT adapter (or none) over one unmerged base.

Each touched module computes ``y = base(x)`` once for the whole batch, then adds each row's block term:
columns ``x[:, cols] @ Δᵀ`` (added to every output) and rows ``x @ Δᵀ`` (scattered into the selected
outputs). The term comes from a Triton kernel (`ops.kernels.multi_adapter`) or the torch reference below,
chosen by ``S2FT_KERNELS`` like the training ops. Equal to running each row alone with its adapter merged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from s2ft_lightning.adapters.format import Adapter, AdapterError, check_base, get_module, module_kind
from s2ft_lightning.experts import ExpertDeltas, expert_correction, routing
from s2ft_lightning.ops import backend_for
from surgery.expert_storage import storage_of
from surgery.linear import logical_weight, split_expert_name


class PackedBlocks:
    """One module's blocks of one feature for all served adapters, zero-padded to a common ``K``.

    ``idx (A, K)`` int32, ``kcnt (A,)`` int32, ``delta`` fp32 ``(A, OUT, K)`` for columns or ``(A, K, IN)``
    for rows. Slot ``A`` (one past the adapters) is all zeros so rows without an adapter index it safely.
    """

    def __init__(self, feature: str, adapters: Sequence[Adapter | None], module: str, shape, device) -> None:
        self.feature = feature
        out_f, in_f = shape
        blocks = [a.block(module, feature) if a is not None else None for a in adapters]
        k = max([len(b.indices) for b in blocks if b is not None] or [0])
        n = len(adapters) + 1
        self.idx = torch.zeros(n, k, dtype=torch.int32)
        self.kcnt = torch.zeros(n, dtype=torch.int32)
        self.delta = torch.zeros((n, out_f, k) if feature == "in" else (n, k, in_f))
        for s, b in enumerate(blocks):
            if b is None:
                continue
            kb = len(b.indices)
            self.idx[s, :kb] = torch.tensor(b.indices, dtype=torch.int32)
            self.kcnt[s] = kb
            if feature == "in":
                self.delta[s, :, :kb] = b.delta
            else:
                self.delta[s, :kb] = b.delta
        self.idx, self.kcnt, self.delta = self.idx.to(device), self.kcnt.to(device), self.delta.to(device)
        self.idx_long = self.idx.long()
        self.users = frozenset(s for s, b in enumerate(blocks) if b is not None)
        self.idx3 = self.idx_long[:, None, :]  # (A+1, 1, K), so the reference path only expands it
        self._delta_t: torch.Tensor | None = None

    @property
    def delta_t(self) -> torch.Tensor:
        """Reference-path operand: ``(A+1, K, OUT)`` contiguous for columns (made on first use; streams ~1.4x
        faster than the transposed view at one token per row), ``(A+1, IN, K)`` view for rows."""
        if self._delta_t is None:
            t = self.delta.transpose(1, 2)
            self._delta_t = t.contiguous() if self.feature == "in" else t
        return self._delta_t


def block_term_torch(
    y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, p: PackedBlocks, identity: bool = False
) -> torch.Tensor:
    """Reference: ``y`` plus each row's block term (fp32 accumulation, one cast). ``slots`` (B,) long.

    ``identity=True`` promises ``slots == arange(B)`` (row i uses adapter i), so no per-row copy is made.
    """
    B, T, _ = x.shape
    delta = p.delta_t
    if identity:
        idx, delta = p.idx3[:B], delta[:B]
    else:
        idx, delta = p.idx3.index_select(0, slots), delta.index_select(0, slots)
    idx = idx.expand(B, T, idx.shape[-1])
    if p.feature == "in":
        xg = x.gather(-1, idx)
        if y.dtype == torch.float32:
            return torch.baddbmm(y, xg, delta)
        return torch.baddbmm(y.float(), xg.float(), delta).to(y.dtype)  # fp32 accumulation, one cast
    g = torch.bmm(x.float(), delta)  # (B, T, K); padded rows are zero
    return y.float().scatter_add(-1, idx, g).to(y.dtype)


def block_term_triton(y: torch.Tensor, x: torch.Tensor, aid: torch.Tensor, p: PackedBlocks) -> torch.Tensor:
    """Triton path: add each row's block term into (a contiguous copy of) ``y``; ``aid`` -1 = none."""
    from s2ft_lightning.ops.kernels.multi_adapter import cols_term_, rows_term_

    y = y.contiguous()
    x = x.contiguous()
    fn = cols_term_ if p.feature == "in" else rows_term_
    return fn(y, x, aid, p.idx, p.delta, p.kcnt)


def adapter_expert_deltas(
    adapter: Adapter, owner_name: str, owner: nn.Module, device: torch.device
) -> dict[int, ExpertDeltas]:
    """Per expert of the experts tensors held by ``owner_name``: the adapter's Down columns and Up rows (stock
    channels)."""
    storage = storage_of(owner)
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for b in adapter.blocks:
        split = split_expert_name(b.module)
        if split is None or split[0] != owner_name:
            continue
        _, param, e = split
        delta = b.delta.to(device)
        up = storage.up_channels(param, list(b.indices)) if b.feature == "out" else None
        if param == storage.down and b.feature == "in":
            parts.setdefault(e, {}).update(down_ch=torch.tensor(b.indices, dtype=torch.long, device=device), down=delta)
        elif up is not None:
            parts.setdefault(e, {}).update(up_ch=torch.tensor(up, dtype=torch.long, device=device), up=delta)
        else:
            raise AdapterError(
                f"{b.module} ({b.feature} features): only Down columns and Up rows of experts can be served "
                "side by side; merge this adapter (merge_adapter / AdapterBank) instead"
            )
    return {e: ExpertDeltas(p.get("down_ch"), p.get("down"), p.get("up_ch"), p.get("up")) for e, p in parts.items()}


class MultiAdapterModel(nn.Module):
    """Serve many adapters at once over one unmerged base; pick one adapter per batch row.

    ``out = mam(input_ids=..., adapter_names=["a", None, "b", ...])``; for ``generate`` use
    ``with mam.use(names): model.generate(...)``. The base must not have any adapter merged.
    """

    def __init__(
        self, model: nn.Module, adapters: Mapping[str, Adapter], backend: str = "auto", verify: bool = True
    ) -> None:
        super().__init__()
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend={backend!r} must be 'auto', 'torch' or 'triton'")
        self.model = model
        self.backend = backend
        self.names = list(adapters)
        items = list(adapters.values())
        for n, a in zip(self.names, items):
            a.validate()
            if verify:
                try:
                    check_base(model, a)
                except AdapterError as e:
                    raise AdapterError(f"adapter {n!r}: {e}") from e
        self._packed: dict[str, list[PackedBlocks]] = {}
        self._experts: dict[str, list[dict[int, ExpertDeltas]]] = {}  # tensors' holder -> per adapter
        self._routed: dict[str, tuple[str, str]] = {}  # holder -> (module hooked, how it is called)
        for module in sorted({m for a in items for m in a.modules}):
            mod = get_module(model, module)
            if module_kind(mod) == "expert":
                owner = module.rsplit(".", 1)[0]
                if owner not in self._experts:
                    dev = logical_weight(mod).device
                    self._experts[owner] = [adapter_expert_deltas(a, owner, mod.owner, dev) for a in items]
                    # DBRX calls its tensors' holder once per expert: hook the routed module above it instead
                    one = mod.storage.call == "one_expert"
                    self._routed[owner] = (owner.rpartition(".")[0], "routed") if one else (owner, mod.storage.call)
                continue
            w = logical_weight(mod)
            feats = [f for f in ("in", "out") if any(a.block(module, f) is not None for a in items)]
            self._packed[module] = [PackedBlocks(f, items, module, tuple(w.shape), w.device) for f in feats]
        self._slots: torch.Tensor | None = None
        self._aid: torch.Tensor | None = None
        self._active: frozenset[int] = frozenset()
        self._identity = False
        self._triton: dict[torch.device, bool] = {}  # backend per device, resolved once per `use`
        self._hooks = [get_module(model, m).register_forward_hook(self._hook(m)) for m in self._packed]
        self._hooks += [
            model.get_submodule(self._routed[m][0]).register_forward_hook(self._experts_hook(m), with_kwargs=True)
            for m in self._experts
        ]

    def _backend(self, device: torch.device) -> str:
        if self.backend != "auto":
            return self.backend
        return backend_for(device)

    def _hook(self, module: str):
        packs = self._packed[module]

        def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._slots is None:
                return None
            active = self._active
            used = [p for p in packs if not p.users.isdisjoint(active)]
            if not used:
                return None
            x = args[0]
            rows = self._slots.shape[0]
            flat = x.shape if x.dim() == 2 else None
            if flat is not None:  # (rows·T, features): token-flattened in row order, as MoE blocks do
                if flat[0] % rows:
                    raise RuntimeError(f"{module}: {flat[0]} flattened tokens do not split into {rows} batch rows")
                x, output = x.view(rows, flat[0] // rows, -1), output.view(rows, flat[0] // rows, -1)
            if x.shape[0] != rows:
                raise RuntimeError(
                    f"{module}: input batch {x.shape[0]} != {rows} adapter names; "
                    "modules that reorder the batch cannot be served per row"
                )
            use_triton = self._triton.get(x.device)
            if use_triton is None:
                use_triton = self._triton[x.device] = self._backend(x.device) == "triton"
            if use_triton and torch.is_grad_enabled() and (x.requires_grad or output.requires_grad):
                # The Triton term writes raw memory and has no backward: gradients need the torch term.
                if self.backend == "triton":
                    raise RuntimeError(
                        f"{module}: the Triton serving kernel has no backward, but this forward needs gradients; "
                        "run it under torch.no_grad() / inference_mode, or serve with backend='torch' (or 'auto')"
                    )
                use_triton = False
            y = output
            for p in used:
                if use_triton:
                    y = block_term_triton(y, x, self._aid, p)
                else:
                    y = block_term_torch(y, x, self._slots, p, self._identity)
            return y.reshape(flat[0], -1) if flat is not None else y

        return hook

    def _experts_hook(self, holder_name: str):
        per_adapter = self._experts[holder_name]
        holder = self.model.get_submodule(holder_name)
        call = self._routed[holder_name][1]

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            used = [a for a in self._active if per_adapter[a]] if self._slots is not None else []
            if not used:
                return None
            storage = storage_of(holder)
            hidden, index, weights, token = routing(holder, storage, args, kwargs, call)
            rows = self._slots.shape[0]
            tokens = hidden.shape[0] // (storage.experts if call == "scaled_inputs" else 1)  # no device sync
            if tokens % rows:
                raise RuntimeError(f"{holder_name}: {tokens} tokens do not split into {rows} batch rows")
            token_slot = self._slots.repeat_interleave(tokens // rows)[token]  # experts see (rows·T, H)
            out = output.reshape(hidden.shape[0], -1)
            for a in used:
                sel = (token_slot == a).nonzero()[:, 0]
                if sel.numel():
                    part = expert_correction(holder, hidden[sel], index[sel], weights[sel], per_adapter[a])
                    out = out.index_add(0, sel, part.to(out.dtype))
            return out.view(output.shape)

        return hook

    @contextlib.contextmanager
    def use(self, adapter_names: Sequence[str | None]) -> Iterator[None]:
        """Within the block, batch row ``i`` of every forward uses adapter ``adapter_names[i]``."""
        ids = []
        for n in adapter_names:
            if n is not None and n not in self.names:
                raise AdapterError(f"unknown adapter {n!r}; served adapters: {self.names}")
            ids.append(-1 if n is None else self.names.index(n))
        dev = next(self.model.parameters()).device
        aid = torch.tensor(ids, dtype=torch.int32, device=dev)
        slots = torch.where(aid < 0, len(self.names), aid).long()  # slot A holds zeros
        prev = (self._slots, self._aid, self._active, self._identity, self._triton)
        self._slots, self._aid, self._active = slots, aid, frozenset(i for i in ids if i >= 0)
        self._identity = ids == list(range(len(ids)))
        self._triton = {}
        try:
            yield
        finally:
            self._slots, self._aid, self._active, self._identity, self._triton = prev

    def forward(self, *args, adapter_names: Sequence[str | None], **kwargs):
        with self.use(adapter_names):
            return self.model(*args, **kwargs)

    def close(self) -> None:
        """Remove the hooks: the wrapped model is the plain base again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
