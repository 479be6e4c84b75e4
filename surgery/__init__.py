"""Model surgery for S²FT: find coupled structures, permute them into blocks, verify the function.

Pure torch + transformers + torch-pruning; never imports Lightning.
"""

from surgery.analyze import StructureError, analyze
from surgery.config import STRATEGIES, SelectionConfig, SelectionError
from surgery.permute import IllegalPermutation, apply_permutations, permute_coupling, permute_elements
from surgery.plan import BlockSlice, PlanError, S2Plan, model_fingerprint
from surgery.planner import apply_plan, make_plan, unapply_plan
from surgery.select import select
from surgery.structures import Coupling, Frozen, Member, ModelStructures
from surgery.transaction import ModelStateError
from surgery.verify import Certificate, VerificationError, verify_function

__all__ = [
    "STRATEGIES",
    "BlockSlice",
    "Certificate",
    "Coupling",
    "Frozen",
    "IllegalPermutation",
    "ModelStateError",
    "Member",
    "ModelStructures",
    "PlanError",
    "S2Plan",
    "SelectionConfig",
    "SelectionError",
    "StructureError",
    "VerificationError",
    "analyze",
    "apply_permutations",
    "apply_plan",
    "make_plan",
    "model_fingerprint",
    "permute_coupling",
    "permute_elements",
    "select",
    "unapply_plan",
    "verify_function",
]
