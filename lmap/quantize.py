"""``lmap quantize IN.gguf OUT.gguf TYPE``: llama-quantize's presets, tensor by tensor.

Three parts:

- **Type choice** (:func:`plan_types`): a port of ``llama_tensor_get_type`` (src/llama-quant.cpp
  in llama.cpp) for the presets offered here. Tensors are visited in llama.cpp's order (global
  tensors first, then layer by layer, by name inside a layer) because the per-layer bumps
  (``use_more_bits`` for attn_v / ffn_down) count tensors as they go. 1-D tensors and norms keep
  their type; a tied ``token_embd`` is treated as the output matrix; a row length that the
  chosen block size does not divide falls back as llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0 ...).
- **Driver** (:func:`quantize_model`): dequantize a slab of rows to float32 (bounded memory: one
  slab of one tensor at a time), quantize it with :func:`lmap.quants.quantize.quantize_rows`,
  stream it to the output through :class:`lmap.gguf_writer.GGUFWriter`.
- **Safety**: the output goes to a temporary file next to OUT, renamed over OUT only when
  complete; any error or Ctrl-C removes it. OUT is never the input (``os.path.samefile``), and an
  existing OUT is replaced only with ``force``.

Everything except ``general.file_type`` (and ``general.quantization_version``, set to 2, the
value every current file has) is copied from the input's metadata, as llama-quantize does;
with an importance matrix the ``quantize.imatrix.*`` keys are added like llama-quantize's.

The top of this module imports only the standard library: ``lmap.cli`` imports it for the
argument definitions, and NumPy/Numba load only when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GGUFError, InvalidParameterError, LmapError, UnsupportedModelError

if TYPE_CHECKING:
    import numpy as np

    from .gguf import GGUFFile, TensorInfo

log = logging.getLogger("lmap")

# ---------------------------------------------------------------------- presets
# name -> (llama_ftype, default tensor type), the QUANT_OPTIONS of tools/quantize/quantize.cpp that
# need no importance matrix. The mixes bump some tensors above the default type (see _Chooser).
PRESETS: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"),
    "F16": (1, "F16"),
    "BF16": (32, "BF16"),
    "Q8_0": (7, "Q8_0"),
    "Q4_0": (2, "Q4_0"),
    "Q4_1": (3, "Q4_1"),
    "Q5_0": (8, "Q5_0"),
    "Q5_1": (9, "Q5_1"),
    "Q2_K": (10, "Q2_K"),
    "Q3_K_S": (11, "Q3_K"),
    "Q3_K_M": (12, "Q3_K"),
    "Q3_K_L": (13, "Q3_K"),
    "Q4_K_S": (14, "Q4_K"),
    "Q4_K_M": (15, "Q4_K"),
    "Q5_K_S": (16, "Q5_K"),
    "Q5_K_M": (17, "Q5_K"),
    "Q6_K": (18, "Q6_K"),
    "IQ4_NL": (25, "IQ4_NL"),
    "IQ4_XS": (30, "IQ4_XS"),
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
# ggml_is_quantized() is false for these: a "requantize" is only from a block format
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})

# llama_ftype values used by the type choice (named as in llama.h)
_Q4_0, _Q5_0, _Q2_K, _Q3_K_S, _Q3_K_M, _Q3_K_L, _Q4_K_S, _Q4_K_M, _Q5_K_M = 2, 8, 10, 11, 12, 13, 14, 15, 17
_IQ4_NL, _IQ4_XS = 25, 30

_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
GGML_QNT_VERSION = 2
SLAB_ELEMENTS = 1 << 22  # float32 values dequantized at a time: 16 MiB per slab, whatever the model size


def resolve_type(name: str) -> tuple[str, int]:
    """A TYPE argument (case-insensitive name, alias or llama_ftype number) -> (preset name, llama_ftype)."""
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return key, PRESETS[key][0]
    if key.isdigit():
        for preset, (ftype, _) in PRESETS.items():
            if ftype == int(key):
                return preset, ftype
    valid = ", ".join([*PRESETS, *ALIASES])
    raise InvalidParameterError(f"unknown quantization type {name!r}; valid types: {valid}")


def _tensor_type(name: str | None, option: str) -> str | None:
    """A ggml type name given to --output-tensor-type / --token-embedding-type."""
    if name is None:
        return None
    from .quants.formats import FORMATS_BY_NAME
    from .quants.quantize import SUPPORTED

    key = name.strip().upper()
    if key not in FORMATS_BY_NAME or key not in SUPPORTED:
        valid = ", ".join(sorted(SUPPORTED, key=lambda n: FORMATS_BY_NAME[n].type_id))
        raise InvalidParameterError(f"{option}: unknown or unsupported tensor type {name!r}; valid: {valid}")
    return key


# ---------------------------------------------------------------------- type choice
@dataclass(frozen=True)
class ModelFacts:
    """The hyperparameters llama_tensor_get_type looks at."""

    arch: str
    n_layer: int
    n_gqa: int
    n_expert: int
    is_70b: bool  # llama.cpp's LLM_TYPE_70B: attn_v gets Q5_K instead of Q3_K/Q4_K

    @staticmethod
    def from_metadata(md: Mapping[str, Any], path: str = "") -> ModelFacts:
        arch = md.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{path}: missing metadata key 'general.architecture'")

        def first(key: str, default: int) -> int:
            v = md.get(key, default)
            if hasattr(v, "__len__") and not isinstance(v, str):  # per-layer arrays: llama.cpp reads layer 0
                v = v[0] if len(v) else default
            try:
                return int(v)
            except (TypeError, ValueError):
                raise GGUFError(f"{path}: metadata key {key!r} should be an integer, got {v!r}") from None

        n_layer = first(f"{arch}.block_count", 0)
        n_head = first(f"{arch}.attention.head_count", 0)
        n_head_kv = first(f"{arch}.attention.head_count_kv", n_head)
        n_expert = first(f"{arch}.expert_count", 0)
        n_gqa = n_head // n_head_kv if n_head_kv else 0
        # the model types whose load_hparams name LLM_TYPE_70B (only that type matters here)
        is_70b = (
            (arch == "llama" and n_expert != 8 and n_layer == 80 and n_head != n_head_kv)
            or (arch in ("qwen2", "deci", "olmo") and n_layer == 80)
            or (arch == "jais2" and n_layer == 68)
        )
        return ModelFacts(arch, n_layer, n_gqa, n_expert, is_70b)


# tensor categories (llama-quant.cpp's tensor_category)
TOKEN_EMBD, ATTN_Q, ATTN_V, ATTN_K, ATTN_QKV, ATTN_KV_B, ATTN_OUTPUT = "token_embd", "q", "v", "k", "qkv", "kv_b", "o"
FFN_UP, FFN_GATE, FFN_DOWN, OUTPUT, OTHER = "up", "gate", "down", "output", "other"
_ATTN_V_LIKE = (ATTN_V, ATTN_QKV, ATTN_KV_B)


def tensor_category(name: str) -> str:
    """Broad role of a tensor from its name (llama.cpp's tensor_get_category, same order of tests)."""
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    for part, cat in (
        ("attn_qkv.weight", ATTN_QKV),
        ("attn_kv_b.weight", ATTN_KV_B),
        ("attn_v.weight", ATTN_V),
        ("attn_k.weight", ATTN_K),
        ("attn_q.weight", ATTN_Q),
        ("attn_output.weight", ATTN_OUTPUT),
        ("ffn_up", FFN_UP),
        ("ffn_gate", FFN_GATE),
        ("ffn_down", FFN_DOWN),
    ):
        if part in name:
            return cat
    return OTHER


_NEVER_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTIZED_GLM5_NEXT = (
    "hc_",
    "indexer.attn_q_b",
    "indexer.attn_k",
    "indexer.proj",
    "indexer_compressor_gate",
    "indexer_compressor_ape",
    "ssm_f_a.weight",
    "ssm_f_b.weight",
    "ssm_g_a.weight",
    "ssm_g_b.weight",
    "ssm_beta.weight",
    "attn_kv_a_mqa.weight",
    "attn_k_b.weight",
    "attn_v_b.weight",
)


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of 1 do not count."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return n


def allows_quantization(name: str, shape: tuple[int, ...], arch: str) -> bool:
    """llama.cpp's tensor_allows_quantization: 2-D/3-D weights, except norms, gates, embeddings of positions ..."""
    if _n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if any(s in name for s in _NEVER_QUANTIZED):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not (arch == "glm5-next" and any(s in name for s in _NEVER_QUANTIZED_GLM5_NEXT))


_LAYER = re.compile(r"blk\.([+-]?\d+)")


def llama_order(names: list[str]) -> list[str]:
    """llama-model-loader's weight_name_comparer: by layer (non-layer tensors first), then by name."""

    def key(n: str) -> tuple[int, bytes]:
        m = _LAYER.match(n)
        return (int(m.group(1)) if m else -1, n.encode("utf-8", errors="surrogateescape"))

    return sorted(names, key=key)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one tensor: ``src`` -> ``dst`` type; ``fallback`` says why the row length forced a change."""

    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length
    src: str
    dst: str
    fallback: str = ""

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def converts(self) -> bool:
        return self.src != self.dst

    def nbytes(self, fmt_name: str) -> int:
        from .quants.formats import FORMATS_BY_NAME

        f = FORMATS_BY_NAME[fmt_name]
        return self.n_elements // f.block_size * f.type_size


class _Chooser:
    """llama_tensor_get_type with its per-model counters (quantize_state_impl)."""

    def __init__(
        self,
        facts: ModelFacts,
        ftype: int,
        default: str,
        names: list[str],
        output_type: str | None,
        token_embd_type: str | None,
        has_imatrix: bool,
    ) -> None:
        self.f = facts
        self.ftype = ftype
        self.default = default
        self.output_type = output_type
        self.token_embd_type = token_embd_type
        self.has_imatrix = has_imatrix
        cats = [tensor_category(n) for n in names]
        self.n_attention_wv = sum(c in _ATTN_V_LIKE for c in cats)
        self.tied = OUTPUT not in cats  # no output.weight: the output reuses token_embd
        self.n_ffn_down = self.n_ffn_gate = self.n_ffn_up = facts.n_layer
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.n_fallback = 0

    def choose(self, name: str, shape: tuple[int, ...], src: str) -> tuple[str, str]:
        """(type, fallback note) for one tensor, in llama_order."""
        from .quants.formats import FORMATS_BY_NAME

        if not allows_quantization(name, shape, self.f.arch):
            return src, ""
        cat = tensor_category(name)
        if self.token_embd_type is not None and cat == TOKEN_EMBD:
            return self.token_embd_type, ""
        if self.output_type is not None and cat == OUTPUT:
            return self.output_type, ""
        new = self.default
        if new in FLOAT_TYPES:
            return new, ""
        new = self._impl(new, name, shape, cat)
        return self._fallback(name, shape, new, FORMATS_BY_NAME)

    def _fallback(self, name: str, shape: tuple[int, ...], new: str, fmts: Mapping[str, Any]) -> tuple[str, str]:
        ncols = shape[0]
        qk = fmts[new].block_size
        if ncols % qk == 0:
            return new, ""
        self.n_fallback += 1
        ret = {
            "IQ1_S": "IQ4_NL",
            "IQ1_M": "IQ4_NL",
            "IQ2_XXS": "IQ4_NL",
            "IQ2_XS": "IQ4_NL",
            "IQ2_S": "IQ4_NL",
            "IQ3_XXS": "IQ4_NL",
            "IQ3_S": "IQ4_NL",
            "IQ4_XS": "IQ4_NL",
            "Q2_K": "Q4_0",
            "Q3_K": "Q4_0",
            "TQ1_0": "Q4_0",
            "TQ2_0": "Q4_0",
            "Q4_K": "Q5_0",
            "Q5_K": "Q5_1",
            "Q6_K": "Q8_0",
        }.get(new)
        if ret is None:
            if qk > 32:
                raise UnsupportedModelError(f"tensor {name!r}: no fallback type is defined for {new}")
            ret = new
        note = f"row length {ncols} is not a multiple of {qk} ({new})"
        if ncols % fmts[ret].block_size:
            ret = "F16"  # not even a 32-block fits: llama.cpp keeps such rows in F16
        return ret, note

    def _layer_info(self, i_layer: int, n_layer: int, name: str) -> tuple[int, int]:
        if self.f.n_expert > 1:
            # expert FFNs are not one tensor per layer in order: read the layer from the name
            m = re.match(r"blk\.([+-]?\d+)\.", name)
            if m is None:
                raise UnsupportedModelError(f"tensor {name!r}: cannot tell its layer (expected blk.N.)")
            i_layer = int(m.group(1))
            if not 0 <= i_layer < n_layer:
                raise UnsupportedModelError(f"tensor {name!r}: layer {i_layer} is outside [0, {n_layer})")
        return i_layer, n_layer

    def _impl(self, new: str, name: str, shape: tuple[int, ...], cat: str) -> str:
        from .quants.formats import FORMATS_BY_NAME

        f, ft = self.f, self.ftype
        if f.arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
            return "Q8_0"  # (F32/F16/BF16 presets never reach here)
        if cat == OUTPUT or (self.tied and cat == TOKEN_EMBD):
            if self.output_type is not None:
                new = self.output_type
            elif f.arch == "falcon" or shape[0] % FORMATS_BY_NAME[new].block_size:
                new = "Q8_0"
            elif new != "Q8_0":
                new = "Q6_K"
        elif cat == TOKEN_EMBD:
            if self.token_embd_type is not None:
                new = self.token_embd_type
            # (only the IQ1/IQ2/IQ3/TQ presets, not offered here, change an untied token_embd)
        elif cat in _ATTN_V_LIKE:
            if ft == _Q2_K:
                new = "Q4_K" if f.n_gqa >= 4 else "Q3_K"
            elif ft == _Q3_K_M:
                new = "Q5_K" if self.i_attention_wv < 2 else "Q4_K"
            elif ft == _Q3_K_L or (ft in (_IQ4_NL, _IQ4_XS) and f.n_gqa >= 4):
                new = "Q5_K"
            elif ft in (_Q4_K_M, _Q5_K_M) and _use_more_bits(self.i_attention_wv, self.n_attention_wv):
                new = "Q6_K"
            elif ft == _Q4_K_S and self.i_attention_wv < 4:
                new = "Q5_K"
            if f.is_70b and new in ("Q3_K", "Q4_K"):
                # 8 heads share each attn_v row there: more bits cost little and help much
                new = "Q5_K"
            if f.n_expert == 8:
                new = "Q8_0"
            self.i_attention_wv += 1
        elif cat == ATTN_K:
            if f.n_expert == 8:
                new = "Q8_0"
        elif cat == FFN_DOWN:
            i_layer, n_layer = self._layer_info(self.i_ffn_down, self.n_ffn_down, name)
            falcon = f.arch == "falcon"
            if ft == _Q2_K:
                new = "Q3_K"
            elif ft == _Q3_K_M:
                if i_layer < n_layer // 16:
                    new = "Q5_K"
                elif not falcon or _use_more_bits(i_layer, n_layer):
                    new = "Q4_K"
                else:
                    new = "Q3_K"
            elif ft == _Q3_K_L:
                new = "Q4_K" if falcon else "Q5_K"
            elif ft == _Q4_K_M:
                if falcon:
                    if i_layer < n_layer // 16:
                        new = "Q6_K"
                    elif _use_more_bits(i_layer, n_layer):
                        new = "Q5_K"
                    else:
                        new = "Q4_K"
                elif _use_more_bits(i_layer, n_layer):
                    new = "Q6_K"
            elif i_layer < n_layer // 8 and ft in (_IQ4_NL, _IQ4_XS) and not self.has_imatrix:
                new = "Q5_K"
            elif ft == _Q5_K_M and _use_more_bits(i_layer, n_layer):
                new = "Q6_K"
            elif ft == _Q4_K_S and not falcon and i_layer < n_layer // 8:
                new = "Q5_K"
            elif ft in (_Q4_0, _Q5_0) and self.has_imatrix and i_layer < n_layer // 8:
                new = "Q4_1" if ft == _Q4_0 else "Q5_1"
            self.i_ffn_down += 1
        elif cat == ATTN_OUTPUT:
            if f.arch != "falcon":
                if f.n_expert == 8:
                    if ft in (_Q2_K, _Q3_K_S, _Q3_K_M, _IQ4_NL, _Q4_K_S, _Q4_K_M, _IQ4_XS):
                        new = "Q5_K"
                elif ft == _Q2_K:
                    new = "Q3_K"
                elif ft == _Q3_K_M:
                    new = "Q4_K"
                elif ft == _Q3_K_L:
                    new = "Q5_K"
            elif ft == _Q3_K_L:
                new = "Q4_K"
        elif cat == FFN_GATE:
            self._layer_info(self.i_ffn_gate, self.n_ffn_gate, name)
            self.i_ffn_gate += 1
        elif cat == FFN_UP:
            self._layer_info(self.i_ffn_up, self.n_ffn_up, name)
            self.i_ffn_up += 1
        # (ATTN_QKV is attn_v-like above, so llama.cpp's own ATTN_QKV branch is never reached)
        return new


def plan_types(
    g: GGUFFile,
    type_name: str,
    *,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    has_imatrix: bool = False,
) -> list[TensorPlan]:
    """Each tensor's target type for preset ``type_name``, in the order the output file lists them."""
    preset, ftype = resolve_type(type_name)
    default = PRESETS[preset][1]
    facts = ModelFacts.from_metadata(g.metadata, g.path)
    names = llama_order(list(g.tensors))
    ch = _Chooser(facts, ftype, default, names, output_tensor_type, token_embedding_type, has_imatrix)
    plans = []
    for name in names:
        info = g.tensors[name]
        dst, note = ch.choose(name, info.shape, info.format.name)
        plans.append(TensorPlan(name, info.shape, info.format.name, dst, note))
    return plans


# ---------------------------------------------------------------------- importance matrix
def load_imatrix(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """An importance matrix from llama-imatrix: per tensor name, float32 [n_mat * cols] mean squared activations.

    Both formats llama-quantize reads: GGUF (``NAME.in_sum2`` / ``NAME.counts`` tensors, divided
    here as it does) and the legacy ``.dat`` file. The second value holds the
    ``quantize.imatrix.*`` keys llama-quantize records in the output.
    """
    import struct

    import numpy as np

    from .gguf import GGUFFile

    p = Path(path)
    if not p.is_file():
        raise InvalidParameterError(f"--imatrix {path}: no such file")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    data: dict[str, np.ndarray] = {}
    datasets: list[str] = []
    chunks = 0
    if magic == b"GGUF":
        with GGUFFile(p) as g:
            sums: dict[str, str] = {}
            counts: dict[str, str] = {}
            for tname in g.tensors:
                if tname.endswith(".in_sum2"):
                    sums[tname[: -len(".in_sum2")]] = tname
                elif tname.endswith(".counts"):
                    counts[tname[: -len(".counts")]] = tname
            if not sums and not counts:
                raise InvalidParameterError(f"--imatrix {path}: no importance data (no *.in_sum2 tensors)")
            if not all(k in g.metadata for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")):
                raise InvalidParameterError(f"--imatrix {path}: missing imatrix.datasets / chunk_count / chunk_size")
            for name in sorted(set(sums) | set(counts)):
                if name not in sums or name not in counts:
                    raise InvalidParameterError(
                        f"--imatrix {path}: {name!r} has sums without counts or counts without sums"
                    )
                s_info, c_info = g.tensors[sums[name]], g.tensors[counts[name]]
                if s_info.format.name != "F32" or c_info.format.name != "F32":
                    raise InvalidParameterError(f"--imatrix {path}: sums and counts of {name!r} must be F32")
                s = np.asarray(g.tensor(sums[name]), np.float32).reshape(-1)
                c = np.rint(np.asarray(g.tensor(counts[name]), np.float64).reshape(-1)).astype(np.float32)
                if c.size == 0 or s.size % c.size:
                    raise InvalidParameterError(f"--imatrix {path}: {name!r} has {s.size} sums for {c.size} counts")
                s = s.reshape(c.size, -1)
                # per matrix (expert): mean over the tokens seen; an expert never routed to gets ones
                out = np.where(c[:, None] > 0, s / np.where(c > 0, c, 1)[:, None], np.float32(1))
                data[name] = np.ascontiguousarray(out, np.float32).reshape(-1)
            ds = g.metadata.get("imatrix.datasets")
            datasets = [str(x) for x in ds] if isinstance(ds, list) else []
            chunks = int(g.metadata.get("imatrix.chunk_count", 0))
    else:
        raw = p.read_bytes()
        pos = 0

        def take(fmt: str, what: str) -> Any:
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > len(raw):
                raise InvalidParameterError(f"--imatrix {path}: truncated legacy imatrix ({what} at byte {pos})")
            v = struct.unpack_from(fmt, raw, pos)
            pos += n
            return v[0] if len(v) == 1 else v

        n_entries = take("<i", "entry count")
        if n_entries < 1:
            raise InvalidParameterError(f"--imatrix {path}: not a GGUF or legacy imatrix file (no entries)")
        for i in range(n_entries):
            ln = take("<i", f"name length of entry {i}")
            if ln < 0 or pos + ln > len(raw):
                raise InvalidParameterError(f"--imatrix {path}: bad name length {ln} for entry {i}")
            name = raw[pos : pos + ln].decode("utf-8", errors="surrogateescape")
            pos += ln
            ncall, nval = take("<ii", f"sizes of entry {name!r}")
            if nval < 1 or pos + 4 * nval > len(raw):
                raise InvalidParameterError(f"--imatrix {path}: bad value count {nval} for {name!r}")
            v = np.frombuffer(raw, "<f4", nval, pos).astype(np.float32)
            pos += 4 * nval
            # legacy files store sum/count*ncall: divide by ncall as llama-quantize does
            data[name] = (v / np.float32(ncall)).astype(np.float32) if ncall > 0 else v
        if pos + 4 <= len(raw):
            chunks = take("<i", "chunk count")
            if pos + 4 <= len(raw):
                ln = take("<i", "dataset name length")
                if ln > 0 and pos + ln <= len(raw):
                    datasets = [raw[pos : pos + ln].decode("utf-8", errors="replace")]
    for name, v in data.items():
        if not np.isfinite(v).all():
            raise InvalidParameterError(f"--imatrix {path}: non-finite values for {name!r}")
    keys: dict[str, Any] = {"quantize.imatrix.file": ("string", str(path)[:127])}
    if datasets:
        keys["quantize.imatrix.dataset"] = ("string", datasets[0][:127])
    keys["quantize.imatrix.entries_count"] = ("uint32", len(data))
    if chunks > 0:
        keys["quantize.imatrix.chunks_count"] = ("uint32", chunks)
    return data, keys


# ---------------------------------------------------------------------- driver
@dataclass
class QuantizeResult:
    """What :func:`quantize_model` wrote."""

    path: Path
    preset: str
    ftype: int
    plans: list[TensorPlan]
    n_elements: int
    src_bytes: int  # tensor data of the input
    dst_bytes: int  # tensor data of the output
    file_size: int
    seconds: float
    n_fallback: int
    requantized: bool

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.dst_bytes / max(self.n_elements, 1)


ProgressFn = Callable[[int, int, TensorPlan, float], None]
StopFn = Callable[[], bool] | None


def _check_stop(stop: StopFn) -> None:
    if stop is not None and stop():
        raise KeyboardInterrupt


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    if not src.exists():
        raise GGUFError(f"{src}: no such file")
    if src.is_dir():
        raise GGUFError(f"{src}: is a directory, not a GGUF file")
    if dst.exists() or dst.is_symlink():
        same = False
        with contextlib.suppress(OSError):
            same = os.path.samefile(src, dst)
        if same:
            raise InvalidParameterError(
                f"{dst}: output is the input file; refusing to overwrite it (even with --force)"
            )
        if dst.is_dir():
            raise InvalidParameterError(f"{dst}: output is a directory; give a file name")
        if not force:
            raise InvalidParameterError(f"{dst}: output file exists; remove it or pass --force to replace it")
    parent = dst.parent
    if not parent.is_dir():
        raise InvalidParameterError(f"{dst}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidParameterError(f"{dst}: cannot write in {parent} (permission denied)")


def _check_plans(
    g: GGUFFile, plans: list[TensorPlan], preset: str, allow_requantize: bool, imatrix: dict[str, np.ndarray] | None
) -> dict[str, np.ndarray] | None:
    """Everything that can be known before the first byte is written; returns the importance vectors to use."""
    from .quants import KERNELS
    from .quants.quantize import SUPPORTED

    for p in plans:
        if not p.converts:
            continue
        if p.src not in KERNELS:
            from_types = ", ".join(KERNELS)
            raise UnsupportedModelError(
                f"{g.path}: tensor {p.name!r} has type {p.src}, which lmap cannot dequantize "
                f"to convert it to {p.dst} (readable types: {from_types})"
            )
        if p.dst not in SUPPORTED:
            raise UnsupportedModelError(
                f"{preset}: tensor {p.name!r} would be {p.dst}, which lmap cannot quantize to yet "
                f"(can: {', '.join(sorted(SUPPORTED))})"
            )
        if p.src not in FLOAT_TYPES and not allow_requantize:
            raise InvalidParameterError(
                f"{g.path}: tensor {p.name!r} is already quantized ({p.src}); requantizing to {preset} loses "
                "quality: start from an F32/F16/BF16 model, or pass --allow-requantize to do it anyway"
            )
    if imatrix is None:
        return None
    use: dict[str, np.ndarray] = {}
    for p in plans:
        v = imatrix.get(p.name)
        if v is None or not p.converts:
            continue
        n_mat = p.shape[2] if len(p.shape) > 2 else 1
        if v.size == p.shape[0] * n_mat:
            use[p.name] = v
        elif tensor_category(p.name) != TOKEN_EMBD:  # llama-quantize ignores a token_embd mismatch
            raise InvalidParameterError(
                f"--imatrix: {v.size} values for tensor {p.name!r}, expected {p.shape[0] * n_mat} "
                "(was the imatrix computed for another model?)"
            )
    return use


def _source_rows(g: GGUFFile, info: TensorInfo) -> tuple[Callable[[int, int, np.ndarray], np.ndarray], int, int]:
    """(read(r0, r1, buf) -> float32 rows, n_rows, cols) for any tensor, 3-D ones as stacked rows."""
    from .quants import QMatrix

    cols = info.shape[0]
    n_rows = info.n_rows
    raw = g.tensor(info.name)
    if info.format.name == "F32":
        flat = raw.reshape(n_rows, cols)
        return (lambda r0, r1, buf: flat[r0:r1]), n_rows, cols
    qm = QMatrix(dataclasses.replace(info, shape=(cols, n_rows)), raw.reshape(n_rows, -1))

    def read(r0: int, r1: int, buf: np.ndarray) -> np.ndarray:
        out = buf[: r1 - r0]
        qm.dequantize_rows(r0, r1, out)
        return out

    return read, n_rows, cols


def _converted(g: GGUFFile, p: TensorPlan, imatrix: np.ndarray | None, stop: StopFn) -> Iterator[np.ndarray]:
    """The tensor's new bytes, one slab of rows at a time."""
    import numpy as np

    from .quants.quantize import quantize_rows

    info = g.tensors[p.name]
    read, n_rows, cols = _source_rows(g, info)
    slab = max(1, min(n_rows, SLAB_ELEMENTS // max(cols, 1)))
    buf = np.empty((slab, cols), np.float32)
    rows_per_mat = info.shape[1] if len(info.shape) > 1 else n_rows
    for r0 in range(0, n_rows, slab):
        _check_stop(stop)
        r1 = min(r0 + slab, n_rows)
        x = read(r0, r1, buf)
        if not np.isfinite(x).all():
            bad = r0 + int(np.argmin(np.isfinite(x).all(axis=1)))
            raise LmapError(
                f"{g.path}: tensor {p.name!r} has a NaN or infinite value in row {bad}; refusing to quantize"
            )
        if imatrix is None or imatrix.size == cols:
            yield quantize_rows(p.dst, x, imatrix)
            continue
        # one importance vector per expert matrix: quantize each expert's rows with its own
        r = r0
        while r < r1:
            m = r // rows_per_mat
            e = min(r1, (m + 1) * rows_per_mat)
            yield quantize_rows(p.dst, x[r - r0 : e - r0], imatrix[m * cols : (m + 1) * cols])
            r = e


def _copied(g: GGUFFile, p: TensorPlan, stop: StopFn) -> Iterator[np.ndarray]:
    import numpy as np

    info = g.tensors[p.name]
    raw = g.tensor(p.name).reshape(-1).view(np.uint8)
    step = 64 << 20
    for a in range(0, info.nbytes, step):
        _check_stop(stop)
        yield raw[a : a + step]


def quantize_model(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    type_name: str,
    *,
    allow_requantize: bool = False,
    force: bool = False,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    imatrix: str | os.PathLike[str] | None = None,
    n_threads: int | None = None,
    progress: ProgressFn | None = None,
    stop: StopFn = None,
) -> QuantizeResult:
    """Write ``dst``: the model ``src`` with its weights converted to preset ``type_name``.

    ``dst`` appears only once complete (temporary file + rename); on any error, or Ctrl-C,
    nothing is left behind and an existing ``dst`` is untouched. ``progress(i, n, plan,
    seconds)`` is called after each tensor; ``stop()`` is polled between slabs of rows and a true
    result cancels the run like a KeyboardInterrupt (which is raised). Raises :class:`LmapError` subclasses naming the
    file, tensor or option at fault.
    """
    t0 = time.perf_counter()
    preset, ftype = resolve_type(type_name)
    ott = _tensor_type(output_tensor_type, "--output-tensor-type")
    tet = _tensor_type(token_embedding_type, "--token-embedding-type")
    if n_threads is not None and n_threads < 1:
        raise InvalidParameterError(f"--threads must be >= 1, got {n_threads}")
    src_p, dst_p = Path(src), Path(dst)
    _check_paths(src_p, dst_p, force)
    im_data, im_keys = load_imatrix(imatrix) if imatrix is not None else (None, {})

    import numba

    from .gguf import GGUFFile
    from .quants.formats import FORMATS_BY_NAME

    g = GGUFFile(src_p)
    before = numba.get_num_threads()
    try:
        if int(g.metadata.get("split.count", 1) or 1) > 1:
            raise UnsupportedModelError(
                f"{src_p}: is one part of a split model ({g.metadata['split.count']} files); merge it first "
                "(llama-gguf-split --merge)"
            )
        plans = plan_types(g, preset, output_tensor_type=ott, token_embedding_type=tet, has_imatrix=im_data is not None)
        for p in plans:
            if p.converts and p.shape[0] % FORMATS_BY_NAME[p.dst].block_size:
                raise InvalidParameterError(
                    f"tensor {p.name!r}: row length {p.shape[0]} is not a multiple of the {p.dst} block size "
                    f"{FORMATS_BY_NAME[p.dst].block_size}; choose another type for it"
                )
        im_use = _check_plans(g, plans, preset, allow_requantize, im_data)
        requantized = any(p.converts and p.src not in FLOAT_TYPES for p in plans)
        if requantized:
            kinds = sorted({p.src for p in plans if p.converts and p.src not in FLOAT_TYPES})
            log.warning(
                "warning: %s is already quantized (%s): requantizing to %s compounds the rounding error",
                src_p,
                "/".join(kinds),
                preset,
            )
        if im_use is not None:
            missing = [p.name for p in plans if p.converts and p.name not in im_use]
            if missing:
                log.info("imatrix has no data for %d converted tensors (first: %s)", len(missing), missing[0])

        if n_threads is not None:
            numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
        return _write(g, src_p, dst_p, preset, ftype, plans, force, requantized, im_use, im_keys, progress, stop, t0)
    finally:
        numba.set_num_threads(before)
        g.close()


def _write(
    g: GGUFFile,
    src_p: Path,
    dst_p: Path,
    preset: str,
    ftype: int,
    plans: list[TensorPlan],
    force: bool,
    requantized: bool,
    im_data: dict[str, np.ndarray] | None,
    im_keys: dict[str, tuple[str, Any]],
    progress: ProgressFn | None,
    stop: StopFn,
    t0: float,
) -> QuantizeResult:
    from .gguf_writer import GGUFWriter
    from .quants.formats import FORMATS_BY_NAME

    # hidden, next to OUT (same file system, so the final rename is atomic), short enough for any NAME_MAX
    tmp = dst_p.parent / f".{dst_p.name[:150]}.{os.getpid()}.{secrets.token_hex(4)}.lmap-tmp"
    try:
        # O_EXCL: never write through someone else's file; 0o666 lets the umask decide, as for any new file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise LmapError(f"{dst_p}: cannot create a file in {dst_p.parent} ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
            w = GGUFWriter(fh, alignment=g.alignment)
            for key, value in g.metadata.items():
                if key not in _SPLIT_KEYS:
                    w.add_kv(key, g.metadata_types[key], value)
            # llama-quantize's gguf_set_val_*: drop the key and append it, so they end the list
            for key, (vtype, value) in {
                "general.quantization_version": ("uint32", GGML_QNT_VERSION),
                "general.file_type": ("uint32", ftype),
                **im_keys,
            }.items():
                w.remove_kv(key)
                w.add_kv(key, vtype, value)
            for p in plans:
                w.add_tensor(p.name, p.shape, FORMATS_BY_NAME[p.dst])
            need = w.total_size
            free = shutil.disk_usage(dst_p.parent).free
            if need > free:
                raise LmapError(
                    f"{dst_p}: the output needs {need / 2**20:.1f} MiB but only {free / 2**20:.1f} MiB are free there"
                )
            w.write_header()
            for i, p in enumerate(plans):
                t = time.perf_counter()
                if p.converts:
                    chunks = _converted(g, p, im_data.get(p.name) if im_data is not None else None, stop)
                else:
                    chunks = _copied(g, p, stop)
                w.write_tensor(p.name, chunks)
                if progress is not None:
                    progress(i, len(plans), p, time.perf_counter() - t)
            w.finish()
            fh.flush()
            os.fsync(fh.fileno())
        _check_stop(stop)  # a cancel that came after the last slab still leaves OUT as it was
        _publish(tmp, src_p, dst_p, force)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise LmapError(f"{dst_p}: cannot write the output ({e.strerror or e})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return QuantizeResult(
        path=dst_p,
        preset=preset,
        ftype=ftype,
        plans=plans,
        n_elements=sum(p.n_elements for p in plans),
        src_bytes=sum(g.tensors[p.name].nbytes for p in plans),
        dst_bytes=sum(p.nbytes(p.dst) for p in plans),
        file_size=dst_p.stat().st_size,
        seconds=time.perf_counter() - t0,
        n_fallback=sum(1 for p in plans if p.fallback),
        requantized=requantized,
    )


def _publish(tmp: Path, src_p: Path, dst_p: Path, force: bool) -> None:
    """Move the finished temporary file to ``dst_p`` (checked again: the output may have appeared meanwhile)."""
    if dst_p.exists():
        with contextlib.suppress(OSError):
            if os.path.samefile(src_p, dst_p):
                raise InvalidParameterError(f"{dst_p}: output is the input file; refusing to overwrite it")
        if not force:
            raise InvalidParameterError(f"{dst_p}: output file appeared while quantizing; not replacing it")
    if force:
        os.replace(tmp, dst_p)
        return
    try:
        os.link(tmp, dst_p)  # atomic, and fails instead of replacing a file created in the meantime
    except FileExistsError:
        raise InvalidParameterError(f"{dst_p}: output file appeared while quantizing; not replacing it") from None
    except OSError:
        os.replace(tmp, dst_p)  # a file system without hard links
        return
    os.unlink(tmp)


# ---------------------------------------------------------------------- CLI
def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def cmd_quantize(args: argparse.Namespace) -> int:
    """``lmap quantize``: progress lines on stderr, the summary on stdout."""

    def progress(i: int, n: int, p: TensorPlan, seconds: float) -> None:
        shape = "x".join(str(d) for d in p.shape)
        size = p.nbytes(p.src)
        if p.converts:
            what = f"{p.src:>6} -> {p.dst:<6} {_mib(size):>12} -> {_mib(p.nbytes(p.dst)):>12}"
        else:
            what = f"{p.src:>6}    (kept) {_mib(size):>12}"
        note = f"  [fallback: {p.fallback}]" if p.fallback else ""
        print(f"[{i + 1:4d}/{n:4d}] {p.name:<40} {shape:>16} {what}{note}", file=sys.stderr, flush=True)

    # Ctrl-C and SIGTERM only raise a flag, polled between slabs of rows: a KeyboardInterrupt raised
    # at an arbitrary bytecode can land inside Numba's cache loading or an import, which were seen
    # to swallow it or to exit by the signal without our cleanup. A second signal stops at once.
    requested: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        r = quantize_model(
            args.input,
            args.output,
            args.type,
            allow_requantize=args.allow_requantize,
            force=args.force,
            output_tensor_type=args.output_tensor_type,
            token_embedding_type=args.token_embedding_type,
            imatrix=args.imatrix,
            n_threads=args.threads,
            progress=None if args.quiet else progress,
            stop=lambda: bool(requested),
        )
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    src_size = Path(args.input).stat().st_size
    fallback = f", {r.n_fallback} tensors fell back to another type (row length)" if r.n_fallback else ""
    print(
        f"{r.path}: {r.preset}, {len(r.plans)} tensors, {_mib(src_size)} -> {_mib(r.file_size)} "
        f"({8.0 * r.src_bytes / max(r.n_elements, 1):.2f} -> {r.bits_per_weight:.2f} bits per weight) "
        f"in {r.seconds:.1f} s{fallback}"
    )
    return 0


def add_quantize_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``lmap quantize`` on the CLI's subparsers (argparse only: nothing heavy is imported here)."""
    types = ", ".join([*PRESETS, *ALIASES])
    q: argparse.ArgumentParser = sub.add_parser(
        "quantize",
        help="convert a GGUF model's weights to another type (llama-quantize's presets and mixes)",
        description=(
            "Write OUTPUT: the model INPUT with its weights converted to TYPE. The K-quant mixes keep "
            "sensitive tensors (output, attn_v, ffn_down of some layers) at higher precision, as "
            "llama-quantize does; norms and other 1-D tensors stay as they are."
        ),
        epilog=f"TYPE is one of: {types} (case-insensitive).",
    )
    q.add_argument("input", help="source GGUF (F32/F16/BF16; a quantized one needs --allow-requantize)")
    q.add_argument("output", help="file to write (must not exist unless --force; never the input)")
    q.add_argument("type", help="target type or mix, e.g. Q4_K_M, Q8_0, F16")
    q.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    q.add_argument(
        "--allow-requantize",
        action="store_true",
        help="accept a source whose weights are already quantized (dequantized first; quality suffers)",
    )
    q.add_argument("--output-tensor-type", default=None, help="type of output.weight (e.g. Q8_0, F16)")
    q.add_argument("--token-embedding-type", default=None, help="type of token_embd.weight (e.g. Q8_0, F16)")
    q.add_argument("--imatrix", default=None, help="importance matrix from llama-imatrix (GGUF or legacy .dat)")
    q.add_argument("--force", action="store_true", help="replace OUTPUT if it exists (never allowed for INPUT)")
    q.add_argument("-q", "--quiet", action="store_true", help="no per-tensor progress lines")
    q.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    q.set_defaults(func=cmd_quantize)
    return q
