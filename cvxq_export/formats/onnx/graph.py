"""A Llama-family decoder with KV cache, built node by node with ``onnx.helper``.

Why build the graph directly instead of ``torch.onnx.export(..., dynamo=True)``:
the point of this format is *where* the quantized weights sit. Every weight
must be ``DequantizeLinear(int initializer) -> MatMul input B`` with nothing in
between (ORT's ``DQMatMulToMatMulNBits`` rule matches exactly that), matrices
with several bit depths are split along K into one such pair per depth,
column permutations are folded into the previous projection where the algebra
allows (down_proj's inputs reorder gate/up's outputs), and the tied embedding
and output head share one initializer. Writing the nodes ourselves makes each
of those a line of code; an exporter would trace float MatMuls that we would
then have to find and rewrite. It is also what onnxruntime-genai's model
builder does. The attention is plain ONNX ops (no contrib ops), so
``onnx.checker`` validates everything but ``GatherBlockQuantized``.

Interface (onnxruntime-genai's names):
  inputs   input_ids [batch, seq] int64, attention_mask [batch, total] int64
           (1 = attend), position_ids [batch, seq] int64,
           past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] float32
  outputs  logits [batch, seq, vocab] float32,
           present.{i}.key / .value [batch, kv_heads, total, head_dim] float32
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ...model import WeightRef
from .qdq import QdqOption

OPSET = 21  # blocked DequantizeLinear and int4 need 21
OPSET_INT2 = 25  # int2 / uint2 need 25 (used only when a split is 2-bit)
IR_VERSION = 10  # onnx 1.23 writes IR 14 by default, which ORT 1.20-1.2x cannot read
IR_VERSION_INT2 = 13  # opset 25 (int2 / uint2) needs IR 13
MS_DOMAIN = "com.microsoft"


@dataclass
class QdqSplit:
    """The part of one matrix stored at one option: ``B_d`` [K_d, N]."""

    option: QdqOption
    columns: np.ndarray  # [K_d] int64: the input columns (original order) this split reads
    codes: np.ndarray  # [K_d, N] int16 (signed for sym, unsigned otherwise)
    scale: np.ndarray  # [K_d / block, N] float16
    zero: np.ndarray | None = None  # [K_d / block, N] int16 (asym)
    offset: np.ndarray | None = None  # [K_d / block, N] float16 (offset)
    input_slice: tuple[int, int] | None = None  # read x[..., a:b] (input already permuted) instead of a Gather


@dataclass
class QdqLinear:
    ref: WeightRef
    splits: list[QdqSplit]  # zero-bit column groups are in none of them
    dequant: np.ndarray  # [N, K] float32, HF layout: what the graph computes (the reference weights)
    bias: np.ndarray | None = None  # [N] float32 (output order of the graph)
    out_perm: np.ndarray | None = None  # [N]: graph output n is HF output out_perm[n] (folded from the next layer)
    full_input: bool = False  # one split reading every column in order: no Gather/Slice


@dataclass
class QdqEmbedding:
    """The token embedding for ``GatherBlockQuantized`` ([V, K], blocks along K)."""

    ref: WeightRef
    option: QdqOption
    codes: np.ndarray  # [V, K] int16
    scale: np.ndarray  # [V, K / block] float16
    zero: np.ndarray | None  # [V, K / block] int16, stored (asym, or 128s for a tied 8-bit sym)
    offset: np.ndarray | None  # [V, K / block] float16
    dequant_gather: np.ndarray  # [V, K] float32: GBQ's fp16 output (+ offset), what the graph embeds
    dequant_head: np.ndarray  # [V, K] float32: the same bytes read by the tied head's MatMulNBits (fp32)


@dataclass
class FloatLinear:
    """An fp32 ``MatMul`` weight (for baselines: the float export that ORT's own
    quantizer starts from)."""

    ref: WeightRef
    weight: np.ndarray  # [K, N] float32 (B layout)
    bias: np.ndarray | None = None


@dataclass
class FloatEmbedding:
    ref: WeightRef
    weight: np.ndarray  # [V, K] float32


@dataclass
class DecoderSpec:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    inv_freq: np.ndarray  # [head_dim / 2] float32 (rope scaling folded in, as HF computes it)
    rope_scale: float  # HF's attention_scaling applied to cos / sin
    norms: dict[str, np.ndarray] = field(default_factory=dict)  # HF name -> [hidden] float32


def _np_dtype(option: QdqOption):
    import ml_dtypes

    table = {(2, True): ml_dtypes.int2, (2, False): ml_dtypes.uint2, (4, True): ml_dtypes.int4,
             (4, False): ml_dtypes.uint4, (8, True): np.int8, (8, False): np.uint8}
    return table[(option.bits, option.signed)]


class GraphBuilder:
    """Nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self.uses_int2 = False

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.unique(name)
        # ml_dtypes int2/int4/uint2/uint4 arrays are written packed (two or four per byte)
        # np.require, not np.ascontiguousarray: that one turns a scalar into shape [1]
        self.initializers.append(numpy_helper.from_array(np.require(array, requirements="C"), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small shared constant (shapes, axes, scalars)."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], name: str | None = None, n_out: int = 1, domain: str = "",
           **attrs) -> str | list[str]:
        from onnx import helper

        node_name = self.unique(name or op_type)
        outputs = [self.unique(f"{node_name}/out{i}" if n_out > 1 else f"{node_name}/out") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, domain=domain or None, **attrs))
        return outputs[0] if n_out == 1 else outputs


# --------------------------------------------------------------------------- pieces


def _rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    """x * rsqrt(mean(x^2) + eps) * weight, in the op pattern ORT fuses to SimplifiedLayerNormalization."""
    sq = g.op("Pow", [x, g.const(2.0, np.float32)], f"{name}/Pow")
    mean = g.op("ReduceMean", [sq, g.const([-1])], f"{name}/ReduceMean", keepdims=1)
    var = g.op("Add", [mean, g.const(eps, np.float32)], f"{name}/AddEps")
    rms = g.op("Sqrt", [var], f"{name}/Sqrt")
    normed = g.op("Div", [x, rms], f"{name}/Div")
    return g.op("Mul", [normed, g.init(f"{name}.weight", weight.astype(np.float32))], f"{name}/Mul")


def _qdq_matmul(g: GraphBuilder, x: str, split: QdqSplit, name: str, *, weight: str | None = None,
                scale: str | None = None, zero: str | None = None) -> str:
    """x [.., K_d] @ DQ(B_d) [K_d, N]: the pair ORT fuses into MatMulNBits. An offset
    split's ``+ o`` per block is not in here: :func:`_offset_correction` adds it for
    every offset split of the matrix at once.

    ``weight``/``scale``/``zero`` override the initializers (the tied head passes
    transposes of the embedding's). Scales are stored fp16 and Cast to fp32: ORT folds
    the Cast into an fp32 initializer before the QDQ fusion (measured), so the file
    keeps 2-byte scales and the MatMul stays fp32 (DequantizeLinear's output takes its
    scale's type, and MatMulNBits' fusion rejects output_dtype in ORT 1.31).
    """
    o = split.option
    if o.bits == 2:
        g.uses_int2 = True
    if weight is None:
        weight = g.init(f"{name}.qweight", split.codes.astype(_np_dtype(o)))
    if scale is None:
        scale = g.op("Cast", [g.init(f"{name}.scales", split.scale.astype(np.float16))], f"{name}/CastScales", to=1)
    dq_inputs = [weight, scale]
    if zero is None and split.zero is not None:
        zero = g.init(f"{name}.zero_points", split.zero.astype(_np_dtype(o)))
    if zero is not None:
        dq_inputs.append(zero)
    w = g.op("DequantizeLinear", dq_inputs, f"{name}/DequantizeLinear", axis=0, block_size=o.block)
    return g.op("MatMul", [x, w], f"{name}/MatMul")


def _split_name(name: str, split: QdqSplit, splits: list[QdqSplit]) -> str:
    """A split's node / initializer prefix: the matrix's name, plus the option when it has several."""
    return f"{name}.{split.option.name}" if len(splits) > 1 else name


def _offset_correction(g: GraphBuilder, inputs: list[str], splits: list[QdqSplit], name: str,
                       offsets: list[str] | None = None) -> str | None:
    """sum over the offset splits d of blocksum(x_d) @ O_d as one product for the whole
    matrix: each split's block sums ([.., K_d / b] by Reshape + ReduceSum of the input it
    reads), concatenated, times the splits' offsets stacked ([sum K_d / b, N] fp16, Cast
    and Concat'ed once at load by ORT's constant folding). Why one product: a decode step
    costs ORT a few microseconds per node whatever its size, and a step is ~1,500 nodes;
    per split it would be four nodes, here it is two or three per split plus one
    MatMul, and the addition rides on the Sum that combines the partial products.
    (A [K, n_blocks] 0/1 indicator MatMul does it in one node but reads K x n_blocks
    fp32 per matrix per token: measured no faster, 13 MB more traffic per token.)"""
    parts = [(x, s) for x, s in zip(inputs, splits) if s.option.kind == "offset"]
    if not parts:
        return None
    sums = []
    for x, s in parts:
        k_d, b = len(s.columns), s.option.block
        blocks = g.op("Reshape", [x, g.const([0, 0, -(-k_d // b), b])], f"{name}.{s.option.name}/BlockView")
        sums.append(g.op("ReduceSum", [blocks, g.const([-1])], f"{name}.{s.option.name}/BlockSums", keepdims=0))
    if offsets is None:
        offsets = [g.init(f"{_split_name(name, s, splits)}.offsets", s.offset.astype(np.float16)) for _, s in parts]
    stacked = offsets[0] if len(offsets) == 1 else g.op("Concat", offsets, f"{name}/StackOffsets", axis=0)
    o32 = g.op("Cast", [stacked], f"{name}/CastOffsets", to=1)  # [sum K_d / b, N]
    s_all = sums[0] if len(sums) == 1 else g.op("Concat", sums, f"{name}/StackBlockSums", axis=-1)  # [B, T, sum K_d/b]
    return g.op("MatMul", [s_all, o32], f"{name}/OffsetMatMul")  # [B, T, N]


def _combine(g: GraphBuilder, terms: list[str], name: str) -> str:
    """One node adding every term (partial products, offset correction, bias, residual)."""
    if len(terms) == 1:
        return terms[0]
    return g.op("Add" if len(terms) == 2 else "Sum", terms, name)


def _linear_terms(g: GraphBuilder, x: str, lin: QdqLinear | FloatLinear, name: str) -> list[str]:
    """The terms whose sum is x @ W^T (+ bias): a fused MatMul per bit depth along K,
    the offset correction, the bias."""
    if isinstance(lin, FloatLinear):
        terms = [g.op("MatMul", [x, g.init(f"{name}.weight", lin.weight.astype(np.float32))], f"{name}/MatMul")]
        if lin.bias is not None:
            terms.append(g.init(f"{name}.bias", lin.bias.astype(np.float32)))
        return terms
    terms, inputs = [], []
    for split in lin.splits:
        sname = _split_name(name, split, lin.splits)
        if lin.full_input:
            xd = x
        elif split.input_slice is not None:  # input already permuted by the previous layer: contiguous
            a, b = split.input_slice
            xd = g.op("Slice", [x, g.const([a]), g.const([b]), g.const([-1])], f"{sname}/SliceInput")
        else:  # permute the activation: this depth's columns
            xd = g.op("Gather", [x, g.init(f"{sname}.columns", split.columns.astype(np.int32))], f"{sname}/GatherInput",
                      axis=-1)
        terms.append(_qdq_matmul(g, xd, split, sname))
        inputs.append(xd)
    corr = _offset_correction(g, inputs, lin.splits, name)
    if corr is not None:
        terms.append(corr)
    if not terms:  # every column group dropped: the product is zeros [B, T, N]
        lead = g.op("Slice", [g.op("Shape", [x], f"{name}/Shape"), g.const([0]), g.const([-1])], f"{name}/Lead")
        shape = g.op("Concat", [lead, g.const([lin.ref.rows])], f"{name}/ZeroShape", axis=0)
        from onnx import helper

        terms.append(g.op("ConstantOfShape", [shape], f"{name}/Zero", value=helper.make_tensor("zero", 1, [1], [0.0])))
    if lin.bias is not None:
        terms.append(g.init(f"{name}.bias", lin.bias.astype(np.float32)))
    return terms


def _linear(g: GraphBuilder, x: str, lin: QdqLinear | FloatLinear, name: str, residual: str | None = None) -> str:
    """One matrix (plus ``residual``, added in the same node)."""
    terms = _linear_terms(g, x, lin, name)
    return _combine(g, ([residual] if residual is not None else []) + terms,
                    f"{name}/Residual" if residual is not None else f"{name}/SumSplits")


def _same_structure(lins: list) -> bool:
    """Whether matrices reading one input can be one MatMul per split (concatenated along N)."""
    first = lins[0]
    if isinstance(first, FloatLinear):
        return all(isinstance(lin, FloatLinear) for lin in lins)
    if not all(isinstance(lin, QdqLinear) and lin.splits for lin in lins):
        return False
    for lin in lins[1:]:
        if lin.full_input != first.full_input or len(lin.splits) != len(first.splits):
            return False
        for a, b in zip(lin.splits, first.splits):
            if (a.option != b.option or a.input_slice != b.input_slice or not np.array_equal(a.columns, b.columns)
                    or (a.zero is None) != (b.zero is None) or (a.offset is None) != (b.offset is None)):
                return False
    return True


def _concat_linears(lins: list, ref: WeightRef) -> QdqLinear | FloatLinear:
    """The matrices stacked along N (outputs), each split's arrays concatenated."""
    n = [lin.ref.rows for lin in lins]
    if any(lin.bias is not None for lin in lins):
        bias = np.concatenate([lin.bias if lin.bias is not None else np.zeros(r, np.float32) for lin, r in zip(lins, n)])
    else:
        bias = None
    if isinstance(lins[0], FloatLinear):
        return FloatLinear(ref, np.concatenate([lin.weight for lin in lins], axis=1), bias)
    cat = lambda arrays: None if arrays[0] is None else np.concatenate(arrays, axis=1)  # noqa: E731
    splits = [QdqSplit(parts[0].option, parts[0].columns, cat([p.codes for p in parts]), cat([p.scale for p in parts]),
                       cat([p.zero for p in parts]), cat([p.offset for p in parts]), parts[0].input_slice)
              for parts in zip(*(lin.splits for lin in lins))]
    return QdqLinear(ref, splits, np.zeros(0), bias, full_input=lins[0].full_input)


def _projections(g: GraphBuilder, x: str, lins: list, names: list[str], fused_name: str, fuse: bool) -> list[str]:
    """Several matrices reading the same input (q, k, v; gate, up): one MatMul per split
    for all of them and a Split of the result when their structures agree (fewer nodes
    per decode step: ORT's cost per node, not per FLOP, dominates decoding a small
    model), else one matrix at a time."""
    if not (fuse and len(lins) > 1 and _same_structure(lins)):
        return [_linear(g, x, lin, name) for lin, name in zip(lins, names)]
    rows = [lin.ref.rows for lin in lins]
    ref = replace(lins[0].ref, name=f"{fused_name}.weight", rows=sum(rows), has_bias=any(l.ref.has_bias for l in lins))
    y = _linear(g, x, _concat_linears(lins, ref), fused_name)
    return g.op("Split", [y, g.const(rows)], f"{fused_name}/Split", n_out=len(lins), axis=-1)


def _embedding(g: GraphBuilder, emb: QdqEmbedding, ids: str) -> tuple[str, dict[str, str]]:
    """GatherBlockQuantized (fp16 scales -> fp16 rows) -> float32 (+ gathered block offsets).
    Returns the hidden states and the initializer names the tied head reuses."""
    o = emb.option
    v, k = emb.codes.shape
    # GBQ takes int4 / uint4 / uint8 (not int8): 8-bit codes are stored uint8 (+128 for sym)
    if o.bits == 8:
        codes = (emb.codes + (128 if o.signed else 0)).astype(np.uint8)
        zero = None if emb.zero is None else emb.zero.astype(np.uint8)
    else:
        codes = emb.codes.astype(_np_dtype(o))
        zero = None if emb.zero is None else emb.zero.astype(_np_dtype(o))
    names = {"weight": g.init(f"{emb.ref.name}.qweight", codes),
             "scales": g.init(f"{emb.ref.name}.scales", emb.scale.astype(np.float16))}
    inputs = [names["weight"], ids, names["scales"]]
    if zero is not None:
        names["zero_points"] = g.init(f"{emb.ref.name}.zero_points", zero)
        inputs.append(names["zero_points"])
    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": o.block}
    if o.bits == 8:
        attrs["bits"] = 8
    rows16 = g.op("GatherBlockQuantized", inputs, "embed_tokens/GatherBlockQuantized", domain=MS_DOMAIN, **attrs)
    h = g.op("Cast", [rows16], "embed_tokens/Cast", to=1)  # [B, T, K]
    if o.kind == "offset":
        names["offsets"] = g.init(f"{emb.ref.name}.offsets", emb.offset.astype(np.float16))
        off = g.op("Gather", [names["offsets"], ids], "embed_tokens/GatherOffsets", axis=0)  # [B, T, K/b] fp16
        off = g.op("Unsqueeze", [g.op("Cast", [off], "embed_tokens/CastOffsets", to=1), g.const([-1])],
                   "embed_tokens/UnsqueezeOffsets")  # [B, T, K/b, 1]
        blocks = g.op("Reshape", [h, g.const([0, 0, k // o.block, o.block])], "embed_tokens/BlockView")
        h = g.op("Reshape", [g.op("Add", [blocks, off], "embed_tokens/AddOffsets"), g.const([0, 0, k])],
                 "embed_tokens/Rows")
    return h, names


def _tied_head(g: GraphBuilder, x: str, emb: QdqEmbedding, names: dict[str, str]) -> str:
    """logits = x @ W^T with W the embedding's own initializers, transposed in the graph.
    ORT constant-folds the Transposes into [K, V] initializers and then fuses
    DequantizeLinear + MatMul into MatMulNBits (measured in ORT 1.31): the file holds
    the embedding's bytes once."""
    o = emb.option
    wt = g.op("Transpose", [names["weight"]], "lm_head/TransposeWeight", perm=[1, 0])  # [K, V]
    s32 = g.op("Cast", [names["scales"]], "lm_head/CastScales", to=1)
    st = g.op("Transpose", [s32], "lm_head/TransposeScales", perm=[1, 0])  # [K/b, V]
    zt = None
    if "zero_points" in names:
        zt = g.op("Transpose", [names["zero_points"]], "lm_head/TransposeZeroPoints", perm=[1, 0])
    # 8-bit codes are uint8 in the shared initializer (GBQ's type): the head reads them as such
    head_option = QdqOption(o.bits, o.block, o.kind if o.bits != 8 else ("asym" if zt is not None else o.kind))
    split = QdqSplit(head_option, np.arange(emb.codes.shape[1]), emb.codes, emb.scale, emb.zero, emb.offset)
    terms = [_qdq_matmul(g, x, split, "lm_head", weight=wt, scale=st, zero=zt)]
    if o.kind == "offset":
        ot = g.op("Transpose", [names["offsets"]], "lm_head/TransposeOffsets", perm=[1, 0])  # [K/b, V] fp16
        terms.append(_offset_correction(g, [x], [split], "lm_head", offsets=[ot]))
    return _combine(g, terms, "lm_head/AddOffset")


def _rope(g: GraphBuilder, spec: DecoderSpec, position_ids: str) -> tuple[str, str]:
    """cos, sin [B, 1, T, D] from positions (computed once, shared by all layers)."""
    pos = g.op("Cast", [position_ids], "rope/CastPositions", to=1)  # [B, T]
    pos = g.op("Unsqueeze", [pos, g.const([-1])], "rope/Unsqueeze")  # [B, T, 1]
    freqs = g.op("Mul", [pos, g.init("rope.inv_freq", spec.inv_freq.astype(np.float32))], "rope/Freqs")  # [B, T, D/2]
    emb = g.op("Concat", [freqs, freqs], "rope/Concat", axis=-1)  # [B, T, D]
    cos, sin = g.op("Cos", [emb], "rope/Cos"), g.op("Sin", [emb], "rope/Sin")
    if spec.rope_scale != 1.0:
        scale = g.const(spec.rope_scale, np.float32)
        cos, sin = g.op("Mul", [cos, scale], "rope/ScaleCos"), g.op("Mul", [sin, scale], "rope/ScaleSin")
    axis = g.const([1])
    return g.op("Unsqueeze", [cos, axis], "rope/cos"), g.op("Unsqueeze", [sin, axis], "rope/sin")


def _apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, half: int, name: str) -> str:
    """x * cos + rotate_half(x) * sin, x [B, H, T, D]; rotate_half(x) = cat(-x2, x1)."""
    x1 = g.op("Slice", [x, g.const([0]), g.const([half]), g.const([-1])], f"{name}/x1")
    x2 = g.op("Slice", [x, g.const([half]), g.const([2 * half]), g.const([-1])], f"{name}/x2")
    rot = g.op("Concat", [g.op("Neg", [x2], f"{name}/Neg"), x1], f"{name}/RotateHalf", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], f"{name}/MulCos"), g.op("Mul", [rot, sin], f"{name}/MulSin")], f"{name}/Add")


def _attention_mask(g: GraphBuilder, input_ids: str, attention_mask: str) -> str:
    """Additive mask [B, 1, 1, T, S]: 0 where query t (absolute position S - T + t) may
    see key s (s <= its position and attention_mask[b, s] = 1), float32 lowest elsewhere
    (not -inf: a fully padded row stays finite)."""
    total = g.op("Gather", [g.op("Shape", [attention_mask], "mask/ShapeMask"), g.const(1)], "mask/Total", axis=0)  # S
    seq = g.op("Gather", [g.op("Shape", [input_ids], "mask/ShapeIds"), g.const(1)], "mask/Seq", axis=0)  # T
    past = g.op("Sub", [total, seq], "mask/Past")
    keys = g.op("Range", [g.const(0), total, g.const(1)], "mask/KeyPositions")  # [S]
    queries = g.op("Range", [past, total, g.const(1)], "mask/QueryPositions")  # [T]
    queries = g.op("Unsqueeze", [queries, g.const([-1])], "mask/QueryColumn")  # [T, 1]
    causal = g.op("LessOrEqual", [keys, queries], "mask/Causal")  # [T, S]
    padded = g.op("Cast", [attention_mask], "mask/Keep", to=9)  # [B, S] bool
    padded = g.op("Unsqueeze", [padded, g.const([1])], "mask/KeepRows")  # [B, 1, S]
    ok = g.op("And", [causal, padded], "mask/Allowed")  # [B, T, S]
    lowest = float(np.finfo(np.float32).min)
    add = g.op("Where", [ok, g.const(0.0, np.float32), g.const(lowest, np.float32)], "mask/Additive")
    return g.op("Unsqueeze", [add, g.const([1, 2])], "mask/Mask5D")  # [B, 1, 1, T, S]


def build_decoder(spec: DecoderSpec, embedding: QdqEmbedding, linears: dict[str, QdqLinear],
                  layer_names: list[dict[str, str]], head: QdqLinear | None, *, producer: str = "cvxq-export",
                  fuse: bool = True):
    """The ModelProto. ``layer_names[i]`` maps q,k,v,o,gate,up,down to HF weight names,
    ``head`` is None when the head is tied to ``embedding``. ``fuse``: q/k/v and gate/up
    of the same structure become one MatMul each (the size bound builds with it off:
    unfused is never smaller)."""
    from onnx import TensorProto, helper

    g = GraphBuilder()
    B, T, P, S = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    H, KV, D = spec.n_heads, spec.n_kv_heads, spec.head_dim
    group = H // KV
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, T]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, S]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, T])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [B, T, spec.vocab])]
    for i in range(spec.n_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT, [B, KV, P, D]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT, [B, KV, S, D]))

    if isinstance(embedding, FloatEmbedding):
        x = g.op("Gather", [g.init(f"{embedding.ref.name}", embedding.weight.astype(np.float32)), "input_ids"],
                 "embed_tokens/Gather", axis=0)
        emb_names = {}
    else:
        x, emb_names = _embedding(g, embedding, "input_ids")  # [B, T, hidden]
    cos, sin = _rope(g, spec, "position_ids")
    mask = _attention_mask(g, "input_ids", "attention_mask")
    scale = g.const(1.0 / np.sqrt(D), np.float32)
    for i, names in enumerate(layer_names):
        p = f"model.layers.{i}"
        h = _rms_norm(g, x, spec.norms[f"{p}.input_layernorm.weight"], spec.rms_eps, f"{p}.input_layernorm")
        q, k, v = _projections(g, h, [linears[names[key]] for key in "qkv"],
                               [f"{p}.self_attn.{key}_proj" for key in "qkv"], f"{p}.self_attn.qkv_proj", fuse)
        # q [B, T, H*D], k and v [B, T, KV*D]
        perm = [0, 2, 1, 3]
        q = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, H, D])], f"{p}/q4")], f"{p}/qT", perm=perm)  # [B,H,T,D]
        k = g.op("Transpose", [g.op("Reshape", [k, g.const([0, 0, KV, D])], f"{p}/k4")], f"{p}/kT", perm=perm)  # [B,KV,T,D]
        v = g.op("Transpose", [g.op("Reshape", [v, g.const([0, 0, KV, D])], f"{p}/v4")], f"{p}/vT", perm=perm)
        q = _apply_rope(g, q, cos, sin, D // 2, f"{p}/rope_q")
        k = _apply_rope(g, k, cos, sin, D // 2, f"{p}/rope_k")
        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], f"{p}/ConcatKey", axis=2)  # [B, KV, S, D]
        v_all = g.op("Concat", [f"past_key_values.{i}.value", v], f"{p}/ConcatValue", axis=2)
        g.nodes.append(helper.make_node("Identity", [k_all], [f"present.{i}.key"], name=g.unique(f"{p}/PresentKey")))
        g.nodes.append(helper.make_node("Identity", [v_all], [f"present.{i}.value"], name=g.unique(f"{p}/PresentValue")))
        # GQA without repeating K/V: the H query heads of KV group j (HF's repeat_kv order)
        # are one [group, T] batch against that group's keys: [B, KV, group, T, D]
        q5 = g.op("Reshape", [q, g.const([0, KV, group, -1, D])], f"{p}/q5")
        kt = g.op("Unsqueeze", [g.op("Transpose", [k_all], f"{p}/keysT", perm=[0, 1, 3, 2]), g.const([2])], f"{p}/k5")
        scores = g.op("MatMul", [q5, kt], f"{p}/Scores")  # [B, KV, group, T, S]
        scores = g.op("Add", [g.op("Mul", [scores, scale], f"{p}/Scale"), mask], f"{p}/Masked")
        probs = g.op("Softmax", [scores], f"{p}/Softmax", axis=-1)
        v5 = g.op("Unsqueeze", [v_all, g.const([2])], f"{p}/v5")  # [B, KV, 1, S, D]
        ctx = g.op("MatMul", [probs, v5], f"{p}/Context")  # [B, KV, group, T, D]
        ctx = g.op("Reshape", [ctx, g.const([0, H, -1, D])], f"{p}/ctx4")  # [B, H, T, D]
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], f"{p}/ctxT", perm=perm), g.const([0, 0, H * D])], f"{p}/ctx")
        x = _linear(g, ctx, linears[names["o"]], f"{p}.self_attn.o_proj", residual=x)
        h = _rms_norm(g, x, spec.norms[f"{p}.post_attention_layernorm.weight"], spec.rms_eps,
                      f"{p}.post_attention_layernorm")
        gate, up = _projections(g, h, [linears[names["gate"]], linears[names["up"]]],
                                [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.mlp.gate_up_proj", fuse)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/Sigmoid")], f"{p}/SiLU"), up], f"{p}/GLU")
        x = _linear(g, act, linears[names["down"]], f"{p}.mlp.down_proj", residual=x)
    h = _rms_norm(g, x, spec.norms["model.norm.weight"], spec.rms_eps, "model.norm")
    logits = _tied_head(g, h, embedding, emb_names) if head is None else _linear(g, h, head, "lm_head")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name=g.unique("logits/Identity")))
    graph = helper.make_graph(g.nodes, "cvxq_decoder", inputs, outputs, g.initializers)
    opset = OPSET_INT2 if g.uses_int2 else OPSET
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name=producer)
    model.ir_version = IR_VERSION_INT2 if g.uses_int2 else IR_VERSION
    return model
