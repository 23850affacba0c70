"""Shared TIR builders of the fag kernels (hand-written TVMScript generated from Python closures).

Conventions (see ABI.md and TVM_NOTES.md):
- All global buffers are flat 1-D with symbolic lengths; every shape/stride comes from bmeta/iparams.
- bfloat16 tensors are declared as raw `uint16` bits and converted here (round-to-nearest-even), so
  NumPy bf16 arrays pass zero-copy (DLPack cannot export ml_dtypes bf16) and rounding is explicit.
- NEVER assign (`x = expr`) inside a `T.vectorized` loop: in TVM 0.27 an assignment is a 1-element
  local buffer and a vectorized loop keeps only its last lane. Everything inside vectorized loops is
  built as expression trees by the Python helpers below (LLVM CSEs the repeated sub-expressions) or
  written through tile buffers.
- Deterministic: fixed loop/reduction orders, no atomics.

Scratch tiles are fp32 2-D `T.decl_buffer`s with compile-time shapes; the register-blocked
micro-kernel (`make_gemm`) works only on those.
"""
from __future__ import annotations

from types import SimpleNamespace

from .._tvm import tirx_script

tirx, T = tirx_script()

FLT_MAX = 3.4028234663852886e38  # exactly float32 max (0x7F7FFFFF)
ALIBI_ROWS = 1024

# bmeta columns (ABI.md)
SQ, SKV, Q_OFF, K_OFF, V_OFF, O_OFF, ROW0, DROP0, PRE, NEXT, PREFIX, MASK_OFF, PSE_OFF, P_SN, P_SI = range(15)
BMETA_WIDTH = 16
# iparams slots
(I_B, I_N2, I_Q_SN, I_Q_SS, I_K_SN, I_K_SS, I_V_SN, I_V_SS, I_O_SN, I_O_SS, I_M_SN, I_M_SI) = range(12)
I_TILE_SKIP, I_Q_START, I_KV_START, I_ALIBI_MODE, I_ALIBI_SQ, I_ALIBI_SKV = 14, 15, 16, 17, 18, 19
I_INVALID_ROWS, I_TOTAL_ROWS, I_MAX_SQ, I_MAX_SKV = 20, 21, 22, 23
IPARAMS_LEN, FPARAMS_LEN = 32, 4
F_SCALE, F_KEEP, F_RKEEP = 0, 1, 2


def ns(**kw) -> SimpleNamespace:
    """A plain Python record passed as a macro argument (TVMScript cannot assign Python objects, but
    evaluates them inline as call arguments)."""
    return SimpleNamespace(**kw)


def pad16(x: int) -> int:
    return (x + 15) // 16 * 16


def f32(x: float):
    return tirx.const(x, "float32")


def neg_flt_max():
    return tirx.const(-FLT_MAX, "float32")


def pos_flt_max():
    return tirx.const(FLT_MAX, "float32")


def neg_inf():
    return tirx.const(float("-inf"), "float32")


# ------------------------------------------------------------------------------------------------
# dtype conversions (expression builders; pass simple expressions, e.g. buffer loads)


class DType:
    """fp32 <-> storage conversions of one kernel dtype."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.storage = "uint16" if dtype == "bfloat16" else dtype
        self.lowp = dtype != "float32"

    def ld(self, buf, idx):
        """buf[idx] widened to fp32."""
        return self.widen(buf[idx])

    def widen(self, x):
        if self.dtype == "float32":
            return x
        if self.dtype == "float16":
            return T.Cast("float32", x)
        return T.reinterpret("float32", T.shift_left(T.Cast("uint32", x), tirx.const(16, "uint32")))

    def _rne_bits(self, x):
        u = T.reinterpret("uint32", x)
        return u + tirx.const(0x7FFF, "uint32") + T.bitwise_and(
            T.shift_right(u, tirx.const(16, "uint32")), tirx.const(1, "uint32"))

    def st(self, x):
        """fp32 -> storage type (round to nearest even)."""
        if self.dtype == "float32":
            return x
        if self.dtype == "float16":
            return T.Cast("float16", x)
        return T.Cast("uint16", T.shift_right(self._rne_bits(x), tirx.const(16, "uint32")))

    def rnd(self, x):
        """fp32 value rounded to the kernel dtype and widened back (identity for fp32)."""
        if self.dtype == "float32":
            return x
        if self.dtype == "float16":
            return T.Cast("float32", T.Cast("float16", x))
        return T.reinterpret("float32", T.bitwise_and(self._rne_bits(x), tirx.const(0xFFFF0000, "uint32")))


# ------------------------------------------------------------------------------------------------
# math


def fexp(x):
    """exp(x) in fp32 as a vectorizable polynomial (Cephes expf: ~1 ulp), exactly 0 for x < -87.34
    (including -inf), so masked scores give P == 0 exactly. TVM lowers T.exp to scalar expf calls."""
    lo, hi = -87.3365478515625, 88.3762626647949
    xc = T.max(T.min(x, f32(hi)), f32(lo))
    n = T.floor(xc * f32(1.44269504088896341) + f32(0.5))
    r = xc - n * f32(0.693359375) + n * f32(2.12194440e-4)
    p = f32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + f32(c)
    p = p * r * r + r + f32(1.0)
    e = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return T.Select(x < f32(lo), f32(0.0), p * e)


# ------------------------------------------------------------------------------------------------
# tile visibility (band rule, analytic)


def band_any_visible(i0, i1, j0, j1, pre, nxt, prefix):
    """Tile [i0,i1) x [j0,j1) (non-empty) has a cell with -PRE <= j-i <= NEXT, or j0 < PREFIX."""
    lo = j0 - i1 + 1
    hi = j1 - 1 - i0
    return T.Or(T.max(lo, -pre) <= T.min(hi, nxt), j0 < prefix)


def band_all_visible(i0, i1, j0, j1, pre, nxt, prefix):
    """Every cell of the tile is visible under the band rule (sufficient condition)."""
    return T.Or(T.And(j1 - 1 - i0 <= nxt, i1 - 1 - j0 <= pre), j1 <= prefix)


def band_cell_visible(gi, gj, pre, nxt, prefix):
    d = gj - gi
    return T.Or(T.And(d <= nxt, -d <= pre), gj < prefix)


# ------------------------------------------------------------------------------------------------
# score of one cell (shared by fwd and bwd)


def pse_value(c, gi, gj):
    """fp32 pse(b, n, gi, gj) for the kernel's pse kind (c: the head context)."""
    spec, dt = c.spec, c.dt
    if spec.pse == "ext":
        return dt.ld(c.pse, c.pse_head + gi * c.p_si + gj)
    if spec.pse == "alibi_c":
        W = c.alibi_skv
        sqa = c.alibi_sq
        top = sqa - ALIBI_ROWS
        m0 = T.Select(gi >= top, gi - top, T.floormod(gi, ALIBI_ROWS))
        c0 = T.Select(gi >= top, gj, gj + (W - ALIBI_ROWS) + T.floormod(gi, ALIBI_ROWS) - gi)
        t = gi - gj
        m1 = T.Select(t >= 0, T.int64(ALIBI_ROWS - 1), t + (ALIBI_ROWS - 1))
        c1 = T.Select(t >= 0, W - 1 - t, W - 1)
        mm = T.Select(c.alibi_mode == 0, m0, m1)
        cc = T.Select(c.alibi_mode == 0, c0, c1)
        mm = T.max(T.min(mm, T.int64(ALIBI_ROWS - 1)), T.int64(0))
        cc = T.max(T.min(cc, W - 1), T.int64(0))
        return dt.ld(c.pse, c.pse_head + mm * c.p_si + cc)
    if spec.pse in ("slopes", "slopes_sqrt"):
        dist = T.abs(T.Cast("float32", (gj + c.kv_start) - (gi + c.q_start)))
        if spec.pse == "slopes_sqrt":
            dist = T.sqrt(dist)
        return -c.slope * dist
    return None


def cell_masked(c, gi, gj, check_band: bool):
    """Boolean expression: cell (gi, gj) masked (band rule when check_band, atten_mask when full_mask),
    or None when nothing can mask it."""
    conds = []
    if check_band:
        conds.append(T.Not(band_cell_visible(gi, gj, c.pre, c.nxt, c.prefix)))
    if c.spec.full_mask:
        conds.append(c.mask[c.mask_head + gi * c.m_si + gj] != tirx.const(0, "uint8"))
    if not conds:
        return None
    out = conds[0]
    for x in conds[1:]:
        out = T.Or(out, x)
    return out


def score_expr(c, raw, gi, gj, check_band: bool):
    """Scaled (+pse, masked -> -FLT_MAX) score of cell (gi, gj) from the raw QK^T value `raw`."""
    spec = c.spec
    pv = pse_value(c, gi, gj)
    if pv is None:
        s = raw * c.scale
    elif spec.pse_add_first:
        s = (raw + pv) * c.scale
    else:
        s = raw * c.scale + pv
    m = cell_masked(c, gi, gj, check_band)
    if m is not None:
        s = T.Select(m, neg_flt_max(), s)
    return s


def drop_keep_factor(c, gi, gj):
    """1/keep_prob if the dropout bit of (b, n, gi, gj) is set, else 0 (fp32)."""
    e = c.drop_head + gi * c.skv + gj
    byte = T.Cast("int32", c.drop[T.shift_right(e, T.int64(3))])
    bit = T.bitwise_and(T.shift_right(byte, T.Cast("int32", T.bitwise_and(e, T.int64(7)))), 1)
    return T.Select(bit != 0, c.rkeep, f32(0.0))


# ------------------------------------------------------------------------------------------------
# loop-nest builders (T.macro)


def make_gemm(M: int, N: int, K: int, mr: int, nr: int, vec: int, trans_a: bool, accum: bool):
    """C[M, N] (+)= sum_k A(m, k) * B[k, n] on fp32 tiles; A(m, k) = A[k, m] if trans_a else A[m, k].

    Register-blocked: C[mr, nr*vec] accumulators, broadcast-FMA over k, B row-major along n. N must be
    a multiple of vec; an N remainder of fewer than nr vectors gets its own narrower block. mr must
    divide M (and be 1 or even).

    The accumulators live in "global"-scope buffers of < 1 KiB (two halves of mr/2 rows): TVM 0.27
    turns those into stack allocas that LLVM promotes to vector registers, whereas "local"-scope
    buffers and anything >= 1 KiB become TVMBackendAllocWorkspace heap memory (then every FMA goes
    through memory)."""
    assert M % mr == 0 and N % vec == 0, (M, N, mr, vec)
    assert mr == 1 or mr % 2 == 0, mr
    NV = nr * vec
    nfull = N // NV
    rem = N % NV  # multiple of vec
    MO = M // mr
    H = mr // 2 if mr >= 2 else 1
    TWO = mr >= 2
    assert H * NV * 4 < 1024, "accumulator half must stay below 1 KiB (stack alloca)"

    def make_block(W: int):
        @T.macro
        def block(C, A, B, mo, n0):
            acc0 = T.decl_buffer((H, W), "float32")
            acc1 = T.decl_buffer((H, W), "float32")
            for r in T.unroll(H):
                for v in T.vectorized(W):
                    if accum:
                        acc0[r, v] = C[mo * mr + r, n0 + v]
                    else:
                        acc0[r, v] = T.float32(0)
            if TWO:
                for r in T.unroll(H):
                    for v in T.vectorized(W):
                        if accum:
                            acc1[r, v] = C[mo * mr + H + r, n0 + v]
                        else:
                            acc1[r, v] = T.float32(0)
            for k in range(K):
                for r in T.unroll(H):
                    for v in T.vectorized(W):
                        if trans_a:
                            acc0[r, v] = acc0[r, v] + A[k, mo * mr + r] * B[k, n0 + v]
                        else:
                            acc0[r, v] = acc0[r, v] + A[mo * mr + r, k] * B[k, n0 + v]
                if TWO:
                    for r in T.unroll(H):
                        for v in T.vectorized(W):
                            if trans_a:
                                acc1[r, v] = acc1[r, v] + A[k, mo * mr + H + r] * B[k, n0 + v]
                            else:
                                acc1[r, v] = acc1[r, v] + A[mo * mr + H + r, k] * B[k, n0 + v]
            for r in T.unroll(H):
                for v in T.vectorized(W):
                    C[mo * mr + r, n0 + v] = acc0[r, v]
            if TWO:
                for r in T.unroll(H):
                    for v in T.vectorized(W):
                        C[mo * mr + H + r, n0 + v] = acc1[r, v]

        return block

    blk_full = make_block(NV)
    blk_rem = make_block(rem if rem else vec)

    @T.macro
    def gemm(C, A, B):
        for mo in range(MO):
            if nfull > 0:
                for no in range(nfull):
                    blk_full(C, A, B, mo, no * NV)
            if rem > 0:
                blk_rem(C, A, B, mo, nfull * NV)

    return gemm


def make_cols(W: int, vec: int, body):
    """for c in [0, W): body(a, c), vectorized in chunks of `vec` lanes plus one (narrower) tail chunk.
    `body` is a T.macro(a, c); `a` is any record the caller passes through."""
    nfull = W // vec
    tail = W % vec

    @T.macro
    def cols(a):
        if nfull > 0:
            for cc in range(nfull):
                for cv in T.vectorized(vec):
                    body(a, cc * vec + cv)
        if tail > 0:
            for cv in T.vectorized(tail):
                body(a, nfull * vec + cv)

    return cols


def make_pack_rows(R: int, W: int, Wp: int, vec: int, dt: DType):
    """dst[r, c] = fp32(src[base + r*stride + c]) for r < nvalid, c < W; zero elsewhere ([R, Wp] tile)."""

    @T.macro
    def cp(a, c):
        a.dst[a.r, c] = dt.ld(a.src, a.base + a.r * a.stride + c)

    @T.macro
    def zc(a, c):
        a.dst[a.r, c] = T.float32(0)

    copy_cols = make_cols(W, vec, cp)
    zero_all = make_cols(Wp, vec, zc)

    @T.macro
    def zero_tail(a):
        if Wp > W:
            for c in T.vectorized(Wp - W):
                a.dst[a.r, W + c] = T.float32(0)

    @T.macro
    def pack(dst, src, base, stride, nvalid):
        for r in range(R):
            if r < nvalid:
                copy_cols(ns(dst=dst, src=src, base=base, stride=stride, r=r))
                zero_tail(ns(dst=dst, r=r))
            else:
                zero_all(ns(dst=dst, r=r))

    return pack


def make_pack_rows_t(R: int, W: int, vec: int, dt: DType):
    """Transposed pack: dst[c, r] = fp32(src[base + r*stride + c]) for r < nvalid, zero for r >= nvalid
    ([W, R] tile, c < W)."""

    @T.macro
    def cp(a, c):
        a.dst[c, a.r] = dt.ld(a.src, a.base + a.r * a.stride + c)

    @T.macro
    def zc(a, c):
        a.dst[c, a.r] = T.float32(0)

    copy_cols = make_cols(W, vec, cp)
    zero_cols = make_cols(W, vec, zc)

    @T.macro
    def pack(dst, src, base, stride, nvalid):
        for r in range(R):
            if r < nvalid:
                copy_cols(ns(dst=dst, src=src, base=base, stride=stride, r=r))
            else:
                zero_cols(ns(dst=dst, r=r))

    return pack


def make_tile_cells(BQ: int, BKV: int, vec: int, cell, pad):
    """Element-wise pass over a [BQ, BKV] tile whose valid part is [ni, nj]:
    cell(c, t, i, j) for valid cells (vectorized over j in chunks of `vec`, scalar tail), pad(c, t, i, j)
    for the padding (so padded cells get defined values)."""
    nch = BKV // vec

    @T.macro
    def cells(c, t):
        for i in range(BQ):
            if i < t.ni:
                for jc in range(T.min(t.nj // vec, nch)):
                    for jv in T.vectorized(vec):
                        cell(c, t, i, jc * vec + jv)
                for jt in range((t.nj // vec) * vec, BKV):
                    if jt < t.nj:
                        cell(c, t, i, jt)
                    else:
                        pad(c, t, i, jt)
            else:
                for j in T.vectorized(BKV):
                    pad(c, t, i, j)

    return cells


# ------------------------------------------------------------------------------------------------
# PrimFunc post-processing


def drop_params(func, keep: list[str]):
    """A copy of `func` with only the parameters named in `keep` (in that order). Used to give every
    specialisation exactly the ABI argument list while the TVMScript declares the superset."""
    by_name = {p.name: p for p in func.params}
    missing = [n for n in keep if n not in by_name]
    if missing:
        raise KeyError(f"parameters {missing} not in {list(by_name)}")
    params = [by_name[n] for n in keep]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)
