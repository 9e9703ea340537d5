"""GGML block formats as data: type id -> name, block size and bytes per block.

This table is all the container needs to validate tensor sizes; the kernels for
each format register themselves in :mod:`lmap.quants` (see ``KERNELS``).
The ids and sizes are those of ggml.h / gguf-py's ``GGML_QUANT_SIZES``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockFormat:
    type_id: int
    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n: int) -> int:
        return n // self.block_size * self.type_size


QK_K = 256

_TABLE = [
    BlockFormat(0, "F32", 1, 4),
    BlockFormat(1, "F16", 1, 2),
    BlockFormat(2, "Q4_0", 32, 2 + 16),
    BlockFormat(3, "Q4_1", 32, 2 + 2 + 16),
    BlockFormat(6, "Q5_0", 32, 2 + 4 + 16),
    BlockFormat(7, "Q5_1", 32, 2 + 2 + 4 + 16),
    BlockFormat(8, "Q8_0", 32, 2 + 32),
    BlockFormat(9, "Q8_1", 32, 4 + 4 + 32),
    BlockFormat(10, "Q2_K", QK_K, 2 + 2 + QK_K // 16 + QK_K // 4),
    BlockFormat(11, "Q3_K", QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),
    BlockFormat(12, "Q4_K", QK_K, 2 + 2 + QK_K // 2 + 12),
    BlockFormat(13, "Q5_K", QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    BlockFormat(14, "Q6_K", QK_K, 2 + QK_K // 16 + 3 * QK_K // 4),
    BlockFormat(15, "Q8_K", QK_K, 4 + QK_K + QK_K // 8),
    BlockFormat(16, "IQ2_XXS", QK_K, 2 + QK_K // 4),
    BlockFormat(17, "IQ2_XS", QK_K, 2 + QK_K // 4 + QK_K // 32),
    BlockFormat(18, "IQ3_XXS", QK_K, 2 + QK_K // 4 + QK_K // 8),
    BlockFormat(19, "IQ1_S", QK_K, 2 + QK_K // 8 + QK_K // 16),
    BlockFormat(20, "IQ4_NL", 32, 2 + 16),
    BlockFormat(21, "IQ3_S", QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    BlockFormat(22, "IQ2_S", QK_K, 2 + QK_K // 4 + QK_K // 16),
    BlockFormat(23, "IQ4_XS", QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),
    BlockFormat(24, "I8", 1, 1),
    BlockFormat(25, "I16", 1, 2),
    BlockFormat(26, "I32", 1, 4),
    BlockFormat(27, "I64", 1, 8),
    BlockFormat(28, "F64", 1, 8),
    BlockFormat(29, "IQ1_M", QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
    BlockFormat(30, "BF16", 1, 2),
    BlockFormat(34, "TQ1_0", QK_K, 2 + 4 * 13),
    BlockFormat(35, "TQ2_0", QK_K, 2 + 64),
    BlockFormat(39, "MXFP4", 32, 1 + 16),
]

FORMATS: dict[int, BlockFormat] = {f.type_id: f for f in _TABLE}
FORMATS_BY_NAME: dict[str, BlockFormat] = {f.name: f for f in _TABLE}

# llama.cpp's general.file_type values (enum llama_ftype), for `lmap info`.
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    25: "IQ4_NL",
    30: "IQ4_XS",
    32: "BF16",
}
