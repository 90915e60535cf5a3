"""The CVXQ native menu: bit depths 0..8 per (row group x column group) unit.

A unit is ``R`` consecutive rows x ``C`` consecutive columns of one weight
matrix (CVXQ: a row cluster x one input column). Each unit picks an option
``(bits, kind)``: bits 0..8 and the uniform or companded quantizer. Its cost
in bits is exact for the packed layout (see ``unit_bits``), its distortion is
the sensitivity-weighted squared error of the rounding actually used:
``sum_elements G^2 * (w_hat - w)^2``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .allocate import Menu
from .calibrate import Sensitivities
from .model import LoadedModel, WeightRef
from .quantizers import CHUNK_ELEMENTS, COMPANDED, MAX_BITS, UNIFORM, QuantizedUnits, quantize

# Side information per unit, in bits (the packed format stores exactly this).
MAP_BITS = 8  # one byte: bit depth (low 4 bits) | quantizer kind (bit 4)
OFFSET_BITS = 16  # fp16 offset (zero point / median / mean)
SCALE_BITS = 16  # fp16 scale, only for units with bits > 0
BUFFER_ALIGN = 64  # each buffer of a tensor starts on a 64-byte boundary
BUFFERS_PER_TENSOR = 4  # codes, map, offsets, scales

# Option index -> (bits, kind). Index 0 is the zero-bit option.
OPTIONS: tuple[tuple[int, int], ...] = ((0, UNIFORM),) + tuple(
    (b, kind) for b in range(1, MAX_BITS + 1) for kind in (UNIFORM, COMPANDED)
)


def unit_bits(bits: int, n_elements: int) -> int:
    """Exact stored bits of one unit at ``bits`` per weight."""
    return MAP_BITS + OFFSET_BITS + (SCALE_BITS + n_elements * bits if bits > 0 else 0)


def encode_map(bits: np.ndarray, kind: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint8) | (kind.astype(np.uint8) << 4)).astype(np.uint8)


def decode_map(unit_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return unit_map & 0x0F, (unit_map >> 4) & 0x01


def tensor_padding_allowance() -> int:
    """Worst-case bytes of rounding + alignment a tensor's buffers may add."""
    return BUFFERS_PER_TENSOR * BUFFER_ALIGN


@dataclass(frozen=True)
class Geometry:
    max_row_group: int = 256
    col_group: int = 1

    def row_group_for(self, rows: int, stat_row_group: int) -> int:
        """Largest divisor of ``rows`` <= max_row_group, preferring multiples
        of the calibration statistic's row group (so statistics align)."""
        divisors = [d for d in range(1, min(rows, self.max_row_group) + 1) if rows % d == 0]
        aligned = [d for d in divisors if d % stat_row_group == 0]
        return max(aligned) if aligned else max(divisors)


def to_units(w: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """[rows, cols] -> [n_units, r*c]; unit index = row_group * (cols // c) + col_group."""
    rows, cols = w.shape
    return w.reshape(rows // r, r, cols // c, c).permute(0, 2, 1, 3).reshape(-1, r * c)


def from_units(u: torch.Tensor, rows: int, cols: int, r: int, c: int) -> torch.Tensor:
    """Inverse of :func:`to_units`."""
    return u.reshape(rows // r, cols // c, r, c).permute(0, 2, 1, 3).reshape(rows, cols)


@dataclass
class TensorUnits:
    """Where one tensor's units sit in the flat menu."""

    ref: WeightRef
    row_group: int
    col_group: int
    start: int  # first unit index in the menu
    n_units: int

    @property
    def unit_size(self) -> int:
        return self.row_group * self.col_group


@dataclass
class NativeMenu:
    tensors: list[TensorUnits]
    menu: Menu  # cost in bits
    options: tuple[tuple[int, int], ...] = OPTIONS


def importance_matrix(sens: Sensitivities, ref: WeightRef) -> torch.Tensor:
    """``[rows, cols]`` float32 output sensitivity G^2 of each weight."""
    st = sens[ref.name]
    return torch.from_numpy(st.element_importance(ref.rows, sens.settings.row_group)).float()


def option_distortions(x: torch.Tensor, imp: torch.Tensor) -> np.ndarray:
    """Importance-weighted squared error of every unit under every option of
    :data:`OPTIONS`: x, imp ``[n, m]`` -> ``[n, len(OPTIONS)]`` float64."""
    n, m = x.shape
    dist = np.empty((n, len(OPTIONS)), dtype=np.float64)
    step = max(1, CHUNK_ELEMENTS // m)  # cache-sized chunks of units, as the quantizers run them
    for lo in range(0, n, step):
        xs, ws = x[lo:lo + step], imp[lo:lo + step]  # [b, m]
        for j, (bits, kind) in enumerate(OPTIONS):
            err = quantize(xs, bits, kind, ws).dequant - xs
            dist[lo:lo + step, j] = (err * err * ws).sum(1).double().numpy()
    return dist


def build_menu(loaded: LoadedModel, sens: Sensitivities, refs: list[WeightRef], geometry: Geometry = Geometry(),
               *, progress: bool = True, distortion: np.ndarray | None = None) -> NativeMenu:
    """Quantize every unit at every option and record exact bits and distortion.
    ``distortion`` (``[n_units, n_options]``, a cached menu's) skips the quantization."""
    from tqdm.auto import tqdm

    layout: list[TensorUnits] = []
    costs: list[np.ndarray] = []
    dists: list[np.ndarray] = []
    start = 0
    total = sum(r.numel for r in refs)
    bar = tqdm(total=total, desc="menu", unit="w", unit_scale=True, disable=not progress or distortion is not None)
    for ref in refs:
        if ref.cols % geometry.col_group:
            raise ValueError(f"{ref.name}: {ref.cols} columns not a multiple of column group {geometry.col_group}")
        r = geometry.row_group_for(ref.rows, sens.settings.row_group)
        c = geometry.col_group
        n = ref.numel // (r * c)
        cost = np.empty((n, len(OPTIONS)), dtype=np.int64)
        for j, (bits, _) in enumerate(OPTIONS):
            cost[:, j] = unit_bits(bits, r * c)
        if distortion is not None:
            dist = np.asarray(distortion[start:start + n], dtype=np.float64)
        else:
            with torch.no_grad():
                x = to_units(loaded.weight_tensor(ref).detach().float().cpu(), r, c)  # [n, r*c]
                imp = to_units(importance_matrix(sens, ref), r, c)  # [n, r*c]
                dist = option_distortions(x, imp)
        layout.append(TensorUnits(ref, r, c, start, n))
        costs.append(cost)
        dists.append(dist)
        start += n
        bar.update(ref.numel)
    bar.close()
    if distortion is not None and start != len(distortion):
        raise ValueError(f"cached native menu has {len(distortion)} units, the model {start}")
    return NativeMenu(layout, Menu(np.concatenate(costs), np.concatenate(dists), unit="bits"))


@dataclass
class NativeTensor:
    """One tensor quantized under the native plan, as the packed format stores it."""

    ref: WeightRef
    row_group: int
    col_group: int
    unit_map: np.ndarray  # [n_units] uint8: bits | kind << 4
    codes: list[torch.Tensor]  # per (bits, kind) group: [n_sel, r*c] uint8, units in index order
    offset: torch.Tensor  # [n_units] fp16
    scale: torch.Tensor  # [n_units] fp16 (0 for zero-bit units)
    dequant: torch.Tensor  # [rows, cols] float32

    def nbytes(self) -> int:
        return native_tensor_bytes(self.unit_map, self.row_group * self.col_group)


def native_tensor_bytes(unit_map: np.ndarray, unit_size: int) -> int:
    """Exact bytes of one tensor in the packed layout: four 64-byte aligned
    buffers (codes bit-packed, map, fp16 offsets, fp16 scales of nonzero units)."""
    bits, _ = decode_map(unit_map)
    code_bytes = -(-int(bits.astype(np.int64).sum()) * unit_size // 8)
    n_units = len(unit_map)
    n_scaled = int((bits > 0).sum())
    return sum(_align(b) for b in (code_bytes, n_units, 2 * n_units, 2 * n_scaled))


def _align(n: int) -> int:
    return -(-n // BUFFER_ALIGN) * BUFFER_ALIGN


def option_units(bits: np.ndarray, kind: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """(bits, kind, unit indices) per option present, in the writer's order: one code
    array per (bits, kind), units in index order; zero-bit units are one group whatever
    their kind."""
    out = []
    for b, k in OPTIONS:
        sel = np.nonzero((bits == b) & ((kind == k) | (b == 0)))[0]
        if b == 0 and k != UNIFORM or len(sel) == 0:
            continue
        out.append((b, k, sel))
    return out


def quantize_tensor(loaded: LoadedModel, sens: Sensitivities, ref: WeightRef, unit_map: np.ndarray,
                    row_group: int, col_group: int) -> NativeTensor:
    """Quantize one tensor with its chosen option per unit."""
    with torch.no_grad():
        x = to_units(loaded.weight_tensor(ref).detach().float().cpu(), row_group, col_group)
        imp = to_units(importance_matrix(sens, ref), row_group, col_group)
        n = x.shape[0]
        dequant = torch.empty_like(x)
        offset = torch.zeros(n, dtype=torch.float16)
        scale = torch.zeros(n, dtype=torch.float16)
        codes: list[torch.Tensor] = []
        bits, kind = decode_map(unit_map)
        for b, k, sel in option_units(bits, kind):
            idx = torch.from_numpy(sel)
            q: QuantizedUnits = quantize(x[idx], b, k, imp[idx])
            dequant[idx] = q.dequant
            offset[idx] = q.offset
            scale[idx] = q.scale
            codes.append(q.codes)
        w_hat = from_units(dequant, ref.rows, ref.cols, row_group, col_group)
    return NativeTensor(ref, row_group, col_group, unit_map, codes, offset, scale, w_hat)
