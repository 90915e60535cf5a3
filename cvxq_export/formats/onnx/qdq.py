"""The ONNX QDQ menu: block quantizers with ONNX Runtime's exact semantics, and
the per-(tensor, column group) options the allocator chooses from.

A weight ``W`` ``[N, K]`` (Hugging Face layout: out x in) becomes the MatMul
input ``B = W^T`` ``[K, N]``, quantized in blocks of ``block`` consecutive
input columns (rows of B) per output, which is what ``DequantizeLinear(axis=0,
block_size=block)`` and ORT's fused ``MatMulNBits`` both mean by a block, and
what llama.cpp's ``Q4_1`` / ``Q8_0`` blocks are along a GGUF row.

Kinds of option (measured in ORT 1.31: every one of them fuses into
``MatMulNBits`` for 2, 4 and 8 bits and blocks 16..128, fp32 or fp16 scales):

* ``sym``:    ``w = q * s``,          ``q`` int2/int4/int8, fp16 ``s``, no zero point;
* ``asym``:   ``w = (q - z) * s``,    ``q, z`` uint2/uint4/uint8, integer zero point;
* ``offset``: ``w = q * s + o``,      ``q`` uint, fp16 ``s`` and fp16 ``o`` per block.
  ``DequantizeLinear`` only takes integer zero points, so the float offset is
  applied as a separate small product: ``x @ W = x @ DQ(q, s) + blocksum(x) @ O``
  with ``O`` ``[K / block, N]``. This is the grid of llama.cpp's Q4_1 (float
  scale and minimum), which SmolLM2's shipped weights sit on, so it can
  reproduce them bit for bit where an integer zero point cannot.
* ``zero``:   the column group is dropped from the MatMul (``w = 0``).

Units are column groups: ``G`` consecutive input columns x all ``N`` outputs
(``G`` a multiple of every block size, so blocks never straddle units and a
unit's error does not depend on which other units share its split).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ...allocate import Menu
from ...errors import CvxqError
from ...model import LoadedModel, WeightRef
from ...quantizers import CLIP_GRID, LOW_BIT_CLIP_GRID, quantize_uniform, worker_count

KINDS = ("zero", "sym", "asym", "offset")
BITS = (2, 4, 8)
BLOCKS = (16, 32, 64, 128)  # powers of two >= 16: ORT's MatMulNBits / GatherBlockQuantized requirement
SCALE_BITS = 16  # scales and offsets are stored as fp16 (a Cast, constant-folded by ORT, feeds DequantizeLinear)
DEFAULT_COL_GROUP = 64
CHUNK_WEIGHTS = 1 << 20  # weights per row chunk while building the menu


@dataclass(frozen=True)
class QdqOption:
    bits: int  # 0, 2, 4 or 8
    block: int  # block size along K (0 for the zero option)
    kind: str  # one of KINDS

    @property
    def name(self) -> str:
        if self.kind == "zero":
            return "zero"
        signed = "int" if self.kind == "sym" else "uint"
        return f"{signed}{self.bits}-b{self.block}-{self.kind}"

    @property
    def signed(self) -> bool:
        return self.kind == "sym"

    def unit_bits(self, k: int, n: int, *, gbq_zero_points: bool = False) -> int:
        """Exact stored bits of ``k`` input columns x ``n`` outputs at this option:
        codes, fp16 scales, zero points (``asym``, or an explicit uint8 zero point of
        128 that an 8-bit ``sym`` embedding needs for its tied head) and fp16 offsets."""
        if self.kind == "zero":
            return 0
        blocks = (k // self.block) * n
        total = k * n * self.bits + blocks * SCALE_BITS
        if self.kind == "asym" or gbq_zero_points:
            total += blocks * self.bits
        if self.kind == "offset":
            total += blocks * SCALE_BITS
        return total


ZERO = QdqOption(0, 0, "zero")
# One fixed table: plan.json stores an index into it per unit (uint8).
OPTIONS: tuple[QdqOption, ...] = (ZERO,) + tuple(
    QdqOption(b, blk, kind) for b in BITS for blk in BLOCKS for kind in ("sym", "asym", "offset"))


def offered(o: QdqOption) -> bool:
    """Options the default menu evaluates. At 8 bits the rounding error is ~256x below
    4 bits', so the kinds and small blocks barely differ in distortion while each costs a
    full pass over the model: 8 bits keeps sym and offset (Q8_0's and Q4_1's grids) with
    blocks >= 32. Everything else in OPTIONS is offered."""
    return not (o.bits == 8 and (o.kind == "asym" or o.block < 32))
OPTION_INDEX = {o: i for i, o in enumerate(OPTIONS)}


def col_group_for(k: int, col_group: int = DEFAULT_COL_GROUP) -> int:
    """Largest power of two <= ``col_group`` dividing ``k`` (at least 16)."""
    g = 1 << (max(16, col_group).bit_length() - 1)
    while g >= 16:
        if k % g == 0:
            return g
        g //= 2
    raise CvxqError(f"a weight has {k} input columns, not a multiple of 16",
                    "ONNX Runtime's MatMulNBits needs blocks of at least 16 inputs; use --format packed for this model")


def legal_options(role: str, k: int, group: int, *, blocks: tuple[int, ...] = BLOCKS) -> list[int]:
    """Indices into OPTIONS a tensor may use.

    Linear: zero, and 2/4/8 bits x every block dividing the column group x all kinds.
    Embedding (``com.microsoft.GatherBlockQuantized``): one option for the whole
    tensor, 4 or 8 bits (GBQ refuses int8: 8-bit sym is stored uint8 + 128), blocks
    dividing the row; no zero option, no 8-bit offset (GBQ would read a missing
    uint8 zero point as 128).
    """
    out = []
    for i, o in enumerate(OPTIONS):
        if o.kind != "zero" and not offered(o):
            continue
        if o.kind == "zero":
            if role == "linear":
                out.append(i)
            continue
        if o.block not in blocks:
            continue
        if role == "linear":
            if o.block <= group and group % o.block == 0:
                out.append(i)
        elif role == "embedding":
            if o.bits in (4, 8) and k % o.block == 0 and not (o.bits == 8 and o.kind == "offset"):
                out.append(i)
    return out


# --------------------------------------------------------------------------- quantizers


@dataclass
class QBlocks:
    """One tensor (or column subset) quantized at one option, in block view."""

    codes: torch.Tensor  # [n_blocks, block] int16: signed for sym, unsigned otherwise
    scale: torch.Tensor  # [n_blocks] float16
    zero: torch.Tensor | None  # [n_blocks] int16 (asym)
    offset: torch.Tensor | None  # [n_blocks] float16 (offset)
    dequant: torch.Tensor  # [n_blocks, block] float32, what MatMulNBits computes


def _wsse(err: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    e2 = err * err
    return (e2 * w).sum(1) if w is not None else e2.sum(1)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-65504.0, 65504.0).to(torch.float16)


def _clip_grid(bits: int) -> tuple[float, ...]:
    if bits >= 6:
        return (1.0,)
    return LOW_BIT_CLIP_GRID if bits <= 2 else CLIP_GRID


def quantize_sym(x: torch.Tensor, bits: int, w: torch.Tensor | None) -> QBlocks:
    """``q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)``, fp16 ``s`` searched per block
    (clip fraction x divisor 2^(b-1)-1 or 2^(b-1), weighted error). x, w: [n, block]."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    amax = x.abs().max(1).values  # [n]
    best = None
    for c in _clip_grid(bits):
        # at 2 bits the extra negative level (divide by 2^(b-1)) matters; at 4+ bits the
        # qmax divisor is what Q8_0-style sources use, and halving the search saves time
        for div in ((qmax, -qmin) if bits <= 2 else (qmax,)):
            s = _fp16(c * amax / div)
            sf = s.float()
            safe = torch.where(sf > 0, sf, torch.ones_like(sf))[:, None]
            q = torch.clamp(torch.round(x / safe), qmin, qmax)
            err = _wsse(q * sf[:, None] - x, w)
            if best is None:
                best = [err, s]
            else:
                better = err < best[0]
                best = [torch.where(better, err, best[0]), torch.where(better, s, best[1])]
    s = best[1]
    sf = s.float()
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))[:, None]
    q = torch.clamp(torch.round(x / safe), qmin, qmax)
    return QBlocks(q.to(torch.int16), s, None, None, q * sf[:, None])


def quantize_asym(x: torch.Tensor, bits: int, w: torch.Tensor | None) -> QBlocks:
    """``w = (q - z) * s`` with integer ``z`` in the code range (ONNX zero point);
    the range always contains 0 so z is representable; clip searched per block."""
    levels = (1 << bits) - 1
    lo = torch.minimum(x.min(1).values, torch.zeros(()))
    hi = torch.maximum(x.max(1).values, torch.zeros(()))
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best = None

    def encode(s: torch.Tensor, lo_c: torch.Tensor):
        sf = s.float()
        safe = torch.where(sf > 0, sf, torch.ones_like(sf))
        z = torch.clamp(torch.round(-lo_c / safe), 0, levels)
        q = torch.clamp(torch.round(x / safe[:, None]) + z[:, None], 0, levels)
        return q, z, (q - z[:, None]) * sf[:, None]

    for c in _clip_grid(bits):
        lo_c = mid - c * half
        s = _fp16(2 * c * half / levels)
        q, z, deq = encode(s, lo_c)
        err = _wsse(deq - x, w)
        if best is None:
            best = [err, s, lo_c]
        else:
            better = err < best[0]
            best = [torch.where(better, err, best[0]), torch.where(better, s, best[1]), torch.where(better, lo_c, best[2])]
    q, z, deq = encode(best[1], best[2])
    return QBlocks(q.to(torch.int16), best[1], z.to(torch.int16), None, deq)


def quantize_offset(x: torch.Tensor, bits: int, w: torch.Tensor | None) -> QBlocks:
    """``w = o + q * s`` with fp16 ``o`` and ``s``: the project's uniform quantizer
    (MSE-optimal clip search), i.e. llama.cpp's Q4_1 grid at 4 bits."""
    qu = quantize_uniform(x, bits, w)
    return QBlocks(qu.codes.to(torch.int16), qu.scale, None, qu.offset, qu.dequant)


def quantize_blocks(x: torch.Tensor, option: QdqOption, w: torch.Tensor | None = None) -> QBlocks:
    if option.kind == "sym":
        return quantize_sym(x, option.bits, w)
    if option.kind == "asym":
        return quantize_asym(x, option.bits, w)
    if option.kind == "offset":
        return quantize_offset(x, option.bits, w)
    raise ValueError(f"option {option.name} has no quantizer")


def block_view(m: torch.Tensor, block: int) -> torch.Tensor:
    """[N, K] -> [N * K / block, block] (blocks along K, row-major)."""
    n, k = m.shape
    return m.reshape(n * (k // block), block)


# --------------------------------------------------------------------------- menu


@dataclass
class QdqTensorUnits:
    """Where one tensor's units sit in the flat menu."""

    ref: WeightRef
    role: str  # "linear" | "embedding"
    group: int  # input columns per unit (K for the embedding: one unit)
    start: int
    n_units: int
    legal: list[int]  # option indices
    tied_head: bool = False  # embedding whose bytes the output head reuses


@dataclass
class QdqMenu:
    tensors: list[QdqTensorUnits]
    menu: Menu  # cost in bits, one column per entry of OPTIONS
    options: tuple[QdqOption, ...] = OPTIONS


def tensor_role(ref: WeightRef) -> str:
    return "embedding" if ref.kind == "embedding" else "linear"


def int2_supported() -> bool:
    """int2 / uint2 need onnx >= 1.20 (opset 25, IR 13) and ml_dtypes >= 0.5 to be written packed."""
    try:
        import ml_dtypes
        from onnx import TensorProto
    except ImportError:
        return False
    return hasattr(ml_dtypes, "int2") and hasattr(TensorProto, "INT2")


def menu_layout(loaded: LoadedModel, refs: list[WeightRef], col_group: int = DEFAULT_COL_GROUP,
                blocks: tuple[int, ...] = BLOCKS) -> list[QdqTensorUnits]:
    """Units and legal options of every tensor (2-bit options only where int2 can be written)."""
    layout, start = [], 0
    two_bit = int2_supported()
    for ref in refs:
        role = tensor_role(ref)
        if role == "embedding":
            g, n_units = ref.cols, 1
        else:
            g = col_group_for(ref.cols, col_group)
            n_units = ref.cols // g
        legal = [j for j in legal_options(role, ref.cols, g, blocks=blocks) if two_bit or OPTIONS[j].bits != 2]
        if not legal:
            raise CvxqError(f"{ref.name}: no ONNX option fits its {ref.cols} columns with blocks {blocks}",
                            "allow smaller blocks (16 or 32)")
        layout.append(QdqTensorUnits(ref, role, g, start, n_units, legal, tied_head=role == "embedding" and bool(ref.also)))
        start += n_units
    return layout


def unit_cost_bits(t: QdqTensorUnits, option: QdqOption) -> int:
    # an 8-bit sym embedding is uint8 + 128 in GBQ (its implicit zero point); the tied head's
    # DequantizeLinear has no implicit 128, so it needs the zero points stored
    gbq_zp = t.role == "embedding" and option.bits == 8 and option.kind == "sym" and t.tied_head
    return option.unit_bits(t.group, t.ref.rows, gbq_zero_points=gbq_zp)


def costs_only_menu(layout: list[QdqTensorUnits]) -> Menu:
    """Costs without distortions (for the achievable size range before calibration)."""
    n = sum(t.n_units for t in layout)
    cost = np.zeros((n, len(OPTIONS)), dtype=np.int64)
    legal = np.zeros((n, len(OPTIONS)), dtype=bool)
    for t in layout:
        rows = slice(t.start, t.start + t.n_units)
        for j in t.legal:
            cost[rows, j] = unit_cost_bits(t, OPTIONS[j])
            legal[rows, j] = True
    return Menu(cost, np.zeros(cost.shape), legal, unit="bits")


@contextmanager
def single_thread():
    """Run torch on one thread: the menu is thousands of small elementwise passes over
    1M-weight chunks, where torch's intra-op threads cost more than they save, and
    measured 10x slower when other processes share the cores."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def build_menu(loaded: LoadedModel, sens, refs: list[WeightRef], *, col_group: int = DEFAULT_COL_GROUP,
               blocks: tuple[int, ...] = BLOCKS, progress: bool = True,
               distortion: np.ndarray | None = None) -> QdqMenu:
    """Quantize every tensor at every legal option; record exact bits and the
    CVXQ-sensitivity-weighted squared error per unit (``sum G^2 (w_hat - w)^2``).
    ``distortion`` (``[n_units, n_options]``, a cached menu's) skips the quantization."""
    from tqdm.auto import tqdm

    from ...native import importance_matrix

    layout = menu_layout(loaded, refs, col_group, blocks)
    base = costs_only_menu(layout)
    cost, legal = base.cost, base.legal
    if distortion is not None:
        if distortion.shape != cost.shape:
            raise ValueError(f"cached ONNX menu has shape {distortion.shape}, expected {cost.shape}")
        return QdqMenu(layout, Menu(cost, np.asarray(distortion, dtype=np.float64), legal, unit="bits"))
    dist = np.zeros(cost.shape, dtype=np.float64)
    work = sum(t.ref.numel * len(t.legal) for t in layout)
    bar = tqdm(total=work, desc="onnx menu", unit="w", unit_scale=True, disable=not progress)

    def option_error(w: torch.Tensor, imp: torch.Tensor, t: QdqTensorUnits, o: QdqOption) -> np.ndarray:
        """``[n_units]`` weighted squared error of tensor ``w`` ``[N, K]`` at option ``o``."""
        n, k = w.shape
        # row chunks of ~1M weights keep each pass of the clip search in cache (2-3x faster
        # than streaming a whole 28M-weight embedding through memory per candidate)
        step = max(1, CHUNK_WEIGHTS // k)
        err = torch.zeros(t.n_units, dtype=torch.float64)
        for r0 in range(0, n, step):
            wc, ic = w[r0:r0 + step], imp[r0:r0 + step]  # [r, K]
            if o.kind == "zero":
                e = ic * wc * wc
            else:
                q = quantize_blocks(block_view(wc, o.block), o, block_view(ic, o.block))
                e = (q.dequant.reshape(wc.shape) - wc) ** 2 * ic  # [r, K]
            err += e.reshape(-1, t.n_units, t.group).sum((0, 2)).double()
        return err.numpy()

    # One option of one tensor per task, on single-threaded torch: each core runs its own
    # clip searches (torch releases the GIL inside its kernels); the errors are the same
    # whichever thread computes them.
    from concurrent.futures import ThreadPoolExecutor

    with torch.no_grad(), single_thread(), ThreadPoolExecutor(max_workers=worker_count()) as pool:
        for t in layout:
            w = loaded.weight_tensor(t.ref).detach().float().cpu()  # [N, K]
            imp = importance_matrix(sens, t.ref)  # [N, K]
            rows = slice(t.start, t.start + t.n_units)
            futures = {j: pool.submit(option_error, w, imp, t, OPTIONS[j]) for j in t.legal}
            for j, f in futures.items():
                dist[rows, j] = f.result()
                bar.update(t.ref.numel)
    bar.close()
    return QdqMenu(layout, Menu(cost, dist, legal, unit="bits"))
