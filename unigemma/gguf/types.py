"""The ggml tensor types unigemma reads: id, name, values per block, bytes per block."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block: int  # values per block
    size: int  # bytes per block


F32, F16, Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 6, 8, 12, 13, 14, 30
TYPES = {t.id: t for t in (
    GGMLType(F32, "F32", 1, 4), GGMLType(F16, "F16", 1, 2), GGMLType(BF16, "BF16", 1, 2),
    GGMLType(Q8_0, "Q8_0", 32, 34), GGMLType(Q4_0, "Q4_0", 32, 18), GGMLType(Q5_0, "Q5_0", 32, 22),
    GGMLType(Q4_K, "Q4_K", 256, 144), GGMLType(Q5_K, "Q5_K", 256, 176), GGMLType(Q6_K, "Q6_K", 256, 210),
)}
# Names of the types we do not read, for error messages (ggml's numbering).
_OTHER = {3: "Q4_1", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
          18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
          26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


def type_name(type_id: int) -> str:
    t = TYPES.get(type_id)
    return t.name if t else _OTHER.get(type_id, f"#{type_id} (unknown)")
