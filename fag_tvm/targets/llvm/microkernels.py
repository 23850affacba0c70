"""LLVM-only loop nests of the CPU kernels: register-blocked micro-kernels, tile packing, element-wise
tile passes (hand-written TVMScript macros generated from Python closures).

- Scratch tiles are fp32 2-D `T.decl_buffer`s with compile-time shapes; the micro-kernel (`make_gemm`)
  works only on those.
- The accumulators are "global"-scope buffers of < 1 KiB: TVM 0.27 turns those into stack allocas that
  LLVM promotes to vector registers, whereas "local"-scope buffers and anything >= 1 KiB become
  TVMBackendAllocWorkspace heap memory (then every FMA goes through memory; measured ~2x slower).
- NEVER assign (`x = expr`) inside a `T.vectorized` loop (TVM 0.27 keeps only its last lane): cell
  bodies are expression trees from fag_tvm.kernels.common, or go through tile buffers.
"""
from __future__ import annotations

from ...core.abi import STATS_LANES
from ...kernels.common.dtype import DType
from ...kernels.common.finite import nonfinite
from ...kernels.common.mask import band_all_visible
from ...kernels.common.pse import pse_region
from ...kernels.common.tir import T, ns, tirx

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


def make_scan_rows(W: int, vec: int, dt: DType):
    """acc[0:vec] += count of non-finite values in rows [0, nrows) x cols [0, W) of src (rows at
    base + r*stride); W compile-time (a head dim)."""
    nfull, tail = W // vec, W % vec

    @T.macro
    def scan(acc, src, base, stride, nrows):
        for r in range(nrows):
            if nfull > 0:
                for cc in range(nfull):
                    for v in T.vectorized(vec):
                        acc[v] = acc[v] + nonfinite(dt.ld(src, base + r * stride + cc * vec + v))
            if tail > 0:
                for v in range(tail):
                    acc[v] = acc[v] + nonfinite(dt.ld(src, base + r * stride + nfull * vec + v))

    return scan


def make_scan_rows_dyn(vec: int, dt: DType):
    """As make_scan_rows with a runtime width (pse rows of Skv_b columns)."""

    @T.macro
    def scan(acc, src, base, stride, nrows, width):
        for r in range(nrows):
            for cc in range(width // vec):
                for v in T.vectorized(vec):
                    acc[v] = acc[v] + nonfinite(dt.ld(src, base + r * stride + cc * vec + v))
            for c in range(width // vec * vec, width):
                acc[0] = acc[0] + nonfinite(dt.ld(src, base + r * stride + c))

    return scan


def make_task_scan(spec, dt: DType, vec: int):
    """Macros that count a task's non-finite inputs into acc[0:vec] and total them into sc[0] (the poison
    rule of kernels/common/finite): q rows of a head, k/v rows of a KV head, dy/o rows and the stats a
    backward reads (lane 0), a head's pse block."""
    rows_d = make_scan_rows(spec.d, vec, dt)
    rows_dv = make_scan_rows(spec.dv, vec, dt)
    rows_pse = make_scan_rows_dyn(vec, DType("float32") if spec.pse in ("slopes", "slopes_sqrt") else dt)

    @T.macro
    def start(acc):
        for v in T.vectorized(vec):
            acc[v] = T.float32(0)

    @T.macro
    def q_rows(acc, gb, md, n):
        rows_d(acc, gb.q, md.q_off + n * md.q_sn, md.q_ss, md.sq)

    @T.macro
    def kv_rows(acc, gb, md, n2):
        rows_d(acc, gb.k, md.k_off + n2 * md.k_sn, md.k_ss, md.skv)
        rows_dv(acc, gb.v, md.v_off + n2 * md.v_sn, md.v_ss, md.skv)

    @T.macro
    def grad_rows(acc, gb, md, n):
        rows_dv(acc, gb.dy, md.o_off + n * md.o_sn, md.o_ss, md.sq)
        rows_dv(acc, gb.o, md.o_off + n * md.o_sn, md.o_ss, md.sq)
        for i in range(md.sq):
            acc[0] = acc[0] + nonfinite(gb.smax[(md.row0 + n * md.sq + i) * STATS_LANES]) \
                + nonfinite(gb.ssum[(md.row0 + n * md.sq + i) * STATS_LANES])

    @T.macro
    def pse_block(acc, gb, md, n):
        if spec.pse != "none":
            rows_pse(acc, gb.pse, pse_region(spec, md, n).base, pse_region(spec, md, n).stride,
                     pse_region(spec, md, n).rows, pse_region(spec, md, n).width)

    @T.macro
    def total(acc, sc):
        sc[0] = T.float32(0)
        for v in range(vec):
            sc[0] = sc[0] + acc[v]

    return ns(start=start, q_rows=q_rows, kv_rows=kv_rows, grad_rows=grad_rows, pse_block=pse_block, total=total)


def make_fill_rows(W: int, vec: int):
    """dst[base + r*stride + c] = value for r < nrows, c < W (W compile-time)."""

    @T.macro
    def body(a, c):
        a.dst[a.base + a.r * a.stride + c] = a.value

    cols = make_cols(W, vec, body)

    @T.macro
    def fill(dst, base, stride, nrows, value):
        for r in range(nrows):
            cols(ns(dst=dst, base=base, stride=stride, r=r, value=value))

    return fill


@T.macro
def fill_rows_dyn(dst, base, stride, nrows, width, value):
    """dst[base + r*stride + c] = value for r < nrows, c < width (runtime width)."""
    for r in range(nrows):
        for c in range(width):
            dst[base + r * stride + c] = value


def make_masked_tile(cells_full, cells_part, band: bool):
    """The element pass of one tile: per-element band checks only in partial tiles (every tile is
    'full' when the kernel has no band rule)."""

    @T.macro
    def tile(c, t):
        if band:
            if band_all_visible(t.i0, t.i0 + t.ni, t.j0, t.j0 + t.nj, c.pre, c.nxt, c.prefix):
                cells_full(c, t)
            else:
                cells_part(c, t)
        else:
            cells_full(c, t)

    return tile


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
