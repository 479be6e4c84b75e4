"""Data model of coupled structures: which weight slices share one intermediate index.

A `Coupling` is a set of `Member`s that must all be permuted together. Index ``i`` of a member
covers the elements ``[offset + i*stride, offset + i*stride + unit)`` along ``axis`` of one
parameter (with ``fixed`` pinning other dims, e.g. the expert dim of a 3-D MoE weight). Members on
``level="group"`` are indexed by kv group instead of by head (GQA): group ``g`` serves heads
``g*group_size … (g+1)*group_size-1``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Level = Literal["unit", "group"]
Feature = Literal["in", "out"]
Kind = Literal["heads", "ffn", "experts"]


@dataclass(frozen=True)
class Member:
    """One parameter slice family of a coupling (see module docstring for the index map)."""

    param: str
    axis: int
    count: int
    unit: int = 1
    offset: int = 0
    stride: int | None = None  # elements between consecutive indices; defaults to ``unit``
    level: Level = "unit"
    role: str | None = None  # "q", "k", "v", "o", "gate", "up", "down", "router", "norm", ...
    module: str | None = None  # owning module name when the member is a feature axis of a linear
    feature: Feature | None = None  # which feature axis of ``module`` this is (in / out)
    fixed: tuple[tuple[int, int], ...] = ()  # (dim, index) pins, e.g. expert e of a 3-D tensor
    module_offset: int = 0  # where ``module``'s feature 0 lies along ``axis`` (expert e of a 2-D [E*I, H]: e*I)

    @property
    def step(self) -> int:
        return self.unit if self.stride is None else self.stride

    @property
    def extent(self) -> int:
        """Number of elements along ``axis`` this member spans, from ``offset``."""
        return (self.count - 1) * self.step + self.unit if self.count else 0

    def element_indices(self, index: int) -> range:
        start = self.offset + index * self.step
        return range(start, start + self.unit)


@dataclass(frozen=True)
class Coupling:
    """Members that share one intermediate index space (heads, FFN channels or experts)."""

    name: str
    kind: Kind
    layer: int
    size: int  # number of unit-level indices (q heads, channels, experts)
    members: tuple[Member, ...]
    group_size: int = 1  # q heads per kv group; 1 without GQA
    rope: bool = False  # heads only: positions rotate inside a head, so only whole heads move
    head_dim: int = 0
    parent: str | None = None  # for per-expert channel couplings: the experts coupling name

    @property
    def num_groups(self) -> int:
        return self.size // self.group_size

    def by_role(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Coupling:
        members = tuple(Member(**{**m, "fixed": tuple(tuple(p) for p in m.get("fixed", ()))}) for m in d["members"])
        return Coupling(**{**d, "members": members})


@dataclass(frozen=True)
class Frozen:
    """A part of the model S²FT leaves frozen although a ratio could train it there, and why.

    ``roles`` are the trainable roles it would hold ("o"/"v" for a token mixer, "up"/"down" for an FFN or
    experts): a ratio whose role has couplings elsewhere trains there; one with none anywhere is refused
    naming these reasons (`surgery.select`). ``layer`` is -1 for a whole tower.
    """

    name: str
    layer: int
    roles: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "roles": list(self.roles), "reason": self.reason}

    @staticmethod
    def from_dict(d: dict) -> Frozen:
        return Frozen(name=d["name"], layer=int(d["layer"]), roles=tuple(d["roles"]), reason=d["reason"])


@dataclass
class ModelStructures:
    """Everything `surgery.analyze` found in one model."""

    model_type: str
    num_layers: int
    couplings: list[Coupling] = field(default_factory=list)
    tied: list[tuple[str, str]] = field(default_factory=list)  # parameter aliases (permuted once)
    notes: list[str] = field(default_factory=list)  # what was skipped and why
    frozen: list[Frozen] = field(default_factory=list)  # parts that stay frozen (partial coverage), with reasons

    def frozen_reasons(self, role: str) -> list[str]:
        """Distinct reasons why parts that could hold ``role`` stay frozen, in first-seen order."""
        return list(dict.fromkeys(f.reason for f in self.frozen if role in f.roles))

    def by_kind(self, kind: Kind) -> list[Coupling]:
        return [c for c in self.couplings if c.kind == kind]

    def __getitem__(self, name: str) -> Coupling:
        for c in self.couplings:
            if c.name == name:
                return c
        raise KeyError(f"no coupling named {name!r}; known: {[c.name for c in self.couplings][:8]}...")

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "couplings": [c.to_dict() for c in self.couplings],
            "tied": [list(t) for t in self.tied],
            "notes": list(self.notes),
            "frozen": [f.to_dict() for f in self.frozen],
        }

    @staticmethod
    def from_dict(d: dict) -> ModelStructures:
        return ModelStructures(
            model_type=d["model_type"],
            num_layers=d["num_layers"],
            couplings=[Coupling.from_dict(c) for c in d["couplings"]],
            tied=[tuple(t) for t in d.get("tied", [])],
            notes=list(d.get("notes", [])),
            frozen=[Frozen.from_dict(f) for f in d.get("frozen", [])],
        )
