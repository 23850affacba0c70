"""The CUDA backward (FA2 structure, DESIGN "CUDA"), one kernel factory per phase, SIMT fp32 math:

  preprocess  grid (B*N2,): per (b, n2) task, the poison scan of its inputs (flag in ws), Di = rowsum(dY o O)
              of its G heads' rows, and their fp32 dQ accumulator rows zeroed
  dkdv        grid (ceil(max Skv / BN), B*N2): one CTA per (KV block, b, n2). K/V tiles in shared memory,
              dK/dV accumulators in registers; loops over the G heads' query blocks (blocks the band rule
              leaves empty skipped exactly as on the CPU, partial tiles masked per element): S and dP, the
              tile's softmax gradient (cells.py), dV += P^T dY, dK += dS^T Q, and -- atomic mode -- dQ += dS K
              by fp32 atomics into ws. dpse is added per column by one thread, rows in order (deterministic).
              With dpse summed over the batch (1NSS pse, B > 1) the grid is (.., N2) and a CTA walks the
              batches in order, so no two CTAs add into one dpse element.
  dq          grid (ceil(max Sq / BM), B*N1), deterministic mode only: one CTA per query block, looping over
              the KV blocks that see it, recomputing S/dP/P/dS with the same macros; dQ in registers, written
              once. No float atomics anywhere: bitwise reproducible.
  postprocess grid (ceil(max(Sq, Skv) / PR), B*N2): poisoned tasks get NaN over dq/dk/dv/dpse; in atomic mode
              dq = cast(scale * dq_acc).

The deterministic flag is a runtime iparams slot (workspace.I_DETERMINISTIC): one build serves both modes.
Every kernel takes the ABI buffers (core/abi.py) plus its grid extents as int32 scalars."""
from __future__ import annotations

from ...core import abi
from ...core.abi import FPARAMS_LEN, I_B, I_N2, IPARAMS_LEN, STATS_LANES, param_names
from ...core.spec import KernelSpec
from ...kernels.common import mask as cmask
from ...kernels.common import softmax as csoft
from ...kernels.common.context import batch_prologue, head_context
from ...kernels.common.dtype import DType
from ...kernels.common.finite import nan32, nonfinite, sat, sat_keep_nan
from ...kernels.common.pse import pse_region, slope_of
from ...kernels.common.tir import T, ns, tirx
from ..llvm.microkernels import drop_params
from . import tiles
from .cells import make_tile_grad
from .workspace import I_DETERMINISTIC

POST_ROWS = 32  # rows of one postprocess CTA
PHASES = ("pre", "dkdv", "dq", "post")


def _ceil(a, b):
    return (a + (b - 1)) // b


def _div32(a, b):
    """a // b of non-negative grid-sized int64 values in 32-bit arithmetic (64-bit division is a GPU subroutine)."""
    return T.Cast("int64", T.truncdiv(T.Cast("int32", a), T.Cast("int32", b)))


def _mod32(a, b):
    return T.Cast("int64", T.truncmod(T.Cast("int32", a), T.Cast("int32", b)))


def kernel_params(spec: KernelSpec) -> list[str]:
    """ABI buffers + the phase's grid extents (int32 scalars, in this order)."""
    return param_names(spec) + ["grid_x", "grid_y"]


def _gb(q, k, v, dy, o, smax, ssum, pse, mask, drop, bm, ip, fp, dq, dk, dv, dpse, ws, **extra):
    return ns(q=q, k=k, v=v, dy=dy, o=o, smax=smax, ssum=ssum, pse=pse, mask=mask, drop=drop, bm=bm, ip=ip, fp=fp,
              dq=dq, dk=dk, dv=dv, dpse=dpse, ws=ws, **extra)


def make_phases(spec: KernelSpec, knobs, smem_scope: str, name: str) -> dict[str, object]:
    """{entry name: PrimFunc} of the four phases (entry = name + "_" + phase). smem_scope: "shared" (OpenCL:
    cuda-sim) or "shared.dyn" (CUDA: tiles over 48 KiB need the opt-in dynamic shared memory)."""
    assert spec.direction == "bwd"
    g = tiles.geometry(spec, knobs)
    dt = DType(spec.dtype)
    SD = dt.storage
    PD = spec.pse_storage_dtype
    G, D, DV, DP = spec.group, spec.d, spec.dv, g.DP
    NT, BM, BN = g.NT, g.BM, g.BN
    DPSE = spec.dpse
    SUM_B = spec.dpse_sum_b
    scan_pse_dt = DType("float32") if spec.pse in ("slopes", "slopes_sqrt") else dt
    SH = tiles.shared_floats(g, DPSE)
    # NaN in the storage type (a constant: CUDA cannot take the address of a folded bf16 bit pattern)
    NAN_ST = tirx.const(0x7FC0, "uint16") if spec.dtype == "bfloat16" else dt.st(nan32())

    load_k = tiles.make_load_rows(BN, g.DP, NT)
    load_v = tiles.make_load_rows(BN, g.DVP, NT)
    load_q = tiles.make_load_rows(BM, g.DP, NT)
    load_dy = tiles.make_load_rows(BM, g.DVP, NT)
    row_stats = tiles.make_row_stats(BM, NT, csoft, STATS_LANES)
    grad = make_tile_grad(spec, dt, g, DPSE)
    grad_nodpse = make_tile_grad(spec, dt, g, False)
    acc_dv, EV = tiles.make_accumulate_t(g, BN, g.DVP, g.PLD, g.VLD)
    acc_dk, EK = tiles.make_accumulate_t(g, BN, g.DP, g.PLD, g.KLD)
    acc_dq, EQ = tiles.make_accumulate_n(g)

    # ---- shared pieces ------------------------------------------------------------------------------------
    @T.macro
    def scan(acc, col, src, sdt, base, stride, nrows, width, tx):
        """acc[0] += non-finite count of rows [0, nrows) x cols [0, width): rows in turn, columns thread-strided
        (no runtime division: 64-bit division is a subroutine call on the GPU). The column goes through a
        local (col[0], clamped to the row) so no guard lets TVM fold the clamp away: POCL 3.0's vectorized
        work-item loops were seen running a `tx < 1`-guarded load for lanes 8, 16, 24 (past the buffer's end)."""
        for r in T.serial(nrows):
            for kk in T.serial(_ceil(width, NT)):
                col[0] = T.min(kk * NT + tx, width - 1)
                if kk * NT + tx < width:
                    acc[0] = acc[0] + nonfinite(sdt.ld(src, base + r * stride + col[0]))

    @T.macro
    def fill(dst, base, stride, r0, r1, width, value, tx):
        """dst rows [r0, r1) x cols [0, width) = value: rows in turn, columns thread-strided."""
        for r in T.serial(r0, T.max(r1, r0)):
            for kk in T.serial(_ceil(width, NT)):
                if kk * NT + tx < width:
                    dst[base + r * stride + T.min(kk * NT + tx, width - 1)] = value

    def item(gb, md, n, i0, j0, rows_row0):
        ni = T.min(md.sq - i0, T.int64(BM))
        nj = T.min(md.skv - j0, T.int64(BN))
        slope = slope_of(spec, gb.pse, md.pse_off + n * md.p_sn)
        return ns(c=head_context(spec, dt, gb, md, n, slope), n=n, i0=i0, j0=j0, ni=ni, nj=nj, rowbase=rows_row0)

    # ---- preprocess ----------------------------------------------------------------------------------------
    @T.macro
    def pre_task(gb, md, a):
        n2: T.let = a.n2
        tx: T.let = a.tx
        acc = T.alloc_buffer((1,), "float32", scope="local")
        col = T.alloc_buffer((1,), "int64", scope="local")
        red = T.alloc_buffer((NT,), "float32", scope=smem_scope)
        acc[0] = T.float32(0)
        for gg in T.serial(G):
            scan(acc, col, gb.q, dt, md.q_off + (n2 * G + gg) * md.q_sn, md.q_ss, md.sq, T.int64(D), tx)
            scan(acc, col, gb.dy, dt, md.o_off + (n2 * G + gg) * md.o_sn, md.o_ss, md.sq, T.int64(DV), tx)
            scan(acc, col, gb.o, dt, md.o_off + (n2 * G + gg) * md.o_sn, md.o_ss, md.sq, T.int64(DV), tx)
            scan(acc, col, gb.smax, DType("float32"), (md.row0 + (n2 * G + gg) * md.sq) * STATS_LANES,
                 T.int64(STATS_LANES), md.sq, T.int64(1), tx)
            scan(acc, col, gb.ssum, DType("float32"), (md.row0 + (n2 * G + gg) * md.sq) * STATS_LANES,
                 T.int64(STATS_LANES), md.sq, T.int64(1), tx)
            if spec.pse != "none":
                scan(acc, col, gb.pse, scan_pse_dt, pse_region(spec, md, n2 * G + gg).base,
                     pse_region(spec, md, n2 * G + gg).stride, pse_region(spec, md, n2 * G + gg).rows,
                     pse_region(spec, md, n2 * G + gg).width, tx)
        scan(acc, col, gb.k, dt, md.k_off + n2 * md.k_sn, md.k_ss, md.skv, T.int64(D), tx)
        scan(acc, col, gb.v, dt, md.v_off + n2 * md.v_sn, md.v_ss, md.skv, T.int64(DV), tx)
        red[tx] = acc[0]
        T.tvm_storage_sync("shared")
        if tx == 0:
            acc[0] = red[0]
            for r in T.serial(NT - 1):
                acc[0] = acc[0] + red[r + 1]
            gb.ws[gb.flags + md.b * gb.n2 + n2] = acc[0]
        for gg in T.serial(G):
            for kk in T.serial(_ceil(md.sq, NT)):
                if kk * NT + tx < md.sq:
                    acc[0] = T.float32(0)
                    for c in T.serial(DV, annotations={"pragma_unroll": 4}):
                        acc[0] = acc[0] + dt.ld(gb.dy, md.o_off + (n2 * G + gg) * md.o_sn + (kk * NT + tx) * md.o_ss + c) \
                            * dt.ld(gb.o, md.o_off + (n2 * G + gg) * md.o_sn + (kk * NT + tx) * md.o_ss + c)
                    gb.ws[md.row0 + (n2 * G + gg) * md.sq + kk * NT + tx] = sat(acc[0])
            fill(gb.ws, gb.dq_acc + (md.row0 + (n2 * G + gg) * md.sq) * DP, T.int64(DP), T.int64(0), md.sq,
                 T.int64(DP), T.float32(0), tx)

    # ---- the KV-block tile loop (dkdv) ----------------------------------------------------------------------
    @T.macro
    def tile(gb, md, a, x):
        tx: T.let = a.tx
        T.tvm_storage_sync("shared")
        load_q(a.sm.qs, g.KLD, dt, gb.q, md.q_off + x.n * md.q_sn + x.i0 * md.q_ss, md.q_ss, x.ni, D, tx)
        load_dy(a.sm.dys, g.VLD, dt, gb.dy, md.o_off + x.n * md.o_sn + x.i0 * md.o_ss, md.o_ss, x.ni, DV, tx)
        row_stats(a.sm, gb, x.rowbase + x.i0, x.rowbase + x.i0, x.ni, tx)
        T.tvm_storage_sync("shared")
        grad(x, a.sm, a.t, tx)
        T.tvm_storage_sync("shared")
        acc_dv(a.sm.ps, a.sm.dys, a.dva, x.ni, tx)
        acc_dk(a.sm.dss, a.sm.qs, a.dka, x.ni, tx)
        if DPSE:
            for jj in T.serial(_ceil(BN, NT)):
                if jj * NT + tx < x.nj:
                    for i in T.serial(x.ni):
                        gb.dpse[x.c.pse_head + (x.i0 + i) * x.c.p_si + x.j0 + jj * NT + tx] = sat_keep_nan(
                            gb.dpse[x.c.pse_head + (x.i0 + i) * x.c.p_si + x.j0 + jj * NT + tx]
                            + a.sm.es[i * g.PLD + jj * NT + tx])
        if gb.ip[I_DETERMINISTIC] == 0:
            for kk in T.serial(EQ):
                a.t[3] = T.float32(0)
                for j in T.serial(x.nj):
                    a.t[3] = a.t[3] + a.sm.dss[(kk * NT + tx) // g.DP * g.PLD + j] * a.sm.ks[j * g.KLD + (kk * NT + tx) % g.DP]
                if T.And((kk * NT + tx) // g.DP < x.ni, (kk * NT + tx) % g.DP < D):
                    T.evaluate(T.call_extern("float32", "atomicAdd", T.address_of(
                        gb.ws[gb.dq_acc + (x.rowbase + x.i0 + (kk * NT + tx) // g.DP) * DP + (kk * NT + tx) % g.DP]),
                        a.t[3]))

    @T.macro
    def kv_block(gb, md, a):
        n2: T.let = a.n2
        tx: T.let = a.tx
        j0: T.let = a.jb * BN
        live: T.let = T.And(j0 < md.skv, gb.ws[gb.flags + md.b * gb.n2 + n2] <= T.float32(0))
        if live:
            nj: T.let = T.min(md.skv - j0, T.int64(BN))
            nqb: T.let = _ceil(md.sq, BM)
            skip: T.let = cmask.skip_tiles(spec.band, md.tile_skip, j0, md.prefix)
            lo: T.let = cmask.q_block_lo(j0, md.nxt, BM, skip)
            hi: T.let = T.max(cmask.q_block_hi(j0, nj, md.sq, nqb, BM, md.pre, md.nxt, skip), lo)
            T.tvm_storage_sync("shared")
            load_k(a.sm.ks, g.KLD, dt, gb.k, md.k_off + n2 * md.k_sn + j0 * md.k_ss, md.k_ss, nj, D, tx)
            load_v(a.sm.vs, g.VLD, dt, gb.v, md.v_off + n2 * md.v_sn + j0 * md.v_ss, md.v_ss, nj, DV, tx)
            for k in T.unroll(EK):
                a.dka[k] = T.float32(0)
            for k in T.unroll(EV):
                a.dva[k] = T.float32(0)
            for gg in T.serial(G):
                for ib in T.serial(lo, hi):
                    tile(gb, md, a, item(gb, md, n2 * G + gg, ib * BM, j0, md.row0 + (n2 * G + gg) * md.sq))
            for k in T.unroll(EK):
                if T.And((k * NT + tx) // g.DP < nj, (k * NT + tx) % g.DP < D):
                    gb.dk[md.k_off + n2 * md.k_sn + (j0 + (k * NT + tx) // g.DP) * md.k_ss + (k * NT + tx) % g.DP] = \
                        dt.st_sat(a.dka[k] * md.scale)
            for k in T.unroll(EV):
                if T.And((k * NT + tx) // g.DVP < nj, (k * NT + tx) % g.DVP < DV):
                    gb.dv[md.v_off + n2 * md.v_sn + (j0 + (k * NT + tx) // g.DVP) * md.v_ss + (k * NT + tx) % g.DVP] = \
                        dt.st_sat(a.dva[k])

    # ---- the query-block loop (deterministic dq) ------------------------------------------------------------
    @T.macro
    def q_tile(gb, md, a, x, n2):
        tx: T.let = a.tx
        T.tvm_storage_sync("shared")
        load_k(a.sm.ks, g.KLD, dt, gb.k, md.k_off + n2 * md.k_sn + x.j0 * md.k_ss, md.k_ss, x.nj, D, tx)
        load_v(a.sm.vs, g.VLD, dt, gb.v, md.v_off + n2 * md.v_sn + x.j0 * md.v_ss, md.v_ss, x.nj, DV, tx)
        T.tvm_storage_sync("shared")
        grad_nodpse(x, a.sm, a.t, tx)
        T.tvm_storage_sync("shared")
        acc_dq(a.sm, a.dqa, x.nj, tx)

    @T.macro
    def q_block(gb, md, a):
        n: T.let = a.n
        tx: T.let = a.tx
        n2: T.let = n // G
        i0: T.let = a.ib * BM
        live: T.let = T.And(i0 < md.sq, gb.ws[gb.flags + md.b * gb.n2 + n2] <= T.float32(0))
        if live:
            ni: T.let = T.min(md.sq - i0, T.int64(BM))
            rowbase: T.let = md.row0 + n * md.sq
            T.tvm_storage_sync("shared")
            load_q(a.sm.qs, g.KLD, dt, gb.q, md.q_off + n * md.q_sn + i0 * md.q_ss, md.q_ss, ni, D, tx)
            load_dy(a.sm.dys, g.VLD, dt, gb.dy, md.o_off + n * md.o_sn + i0 * md.o_ss, md.o_ss, ni, DV, tx)
            row_stats(a.sm, gb, rowbase + i0, rowbase + i0, ni, tx)
            for k in T.unroll(EQ):
                a.dqa[k] = T.float32(0)
            nqb: T.let = _ceil(md.sq, BM)
            for jb in T.serial(_ceil(md.skv, BN)):
                skip: T.let = cmask.skip_tiles(spec.band, md.tile_skip, jb * BN, md.prefix)
                lo: T.let = cmask.q_block_lo(jb * BN, md.nxt, BM, skip)
                hi: T.let = cmask.q_block_hi(jb * BN, T.min(md.skv - jb * BN, T.int64(BN)), md.sq, nqb, BM, md.pre,
                                             md.nxt, skip)
                if T.And(a.ib >= lo, a.ib < hi):
                    q_tile(gb, md, a, item(gb, md, n, i0, jb * BN, rowbase), n2)
            for k in T.unroll(EQ):
                if T.And((k * NT + tx) // g.DP < ni, (k * NT + tx) % g.DP < D):
                    gb.dq[md.q_off + n * md.q_sn + (i0 + (k * NT + tx) // g.DP) * md.q_ss + (k * NT + tx) % g.DP] = \
                        dt.st_sat(a.dqa[k] * md.scale)

    # ---- postprocess ----------------------------------------------------------------------------------------
    @T.macro
    def post_task(gb, md, a):
        n2: T.let = a.n2
        tx: T.let = a.tx
        r0: T.let = a.rb * POST_ROWS
        if gb.ws[gb.flags + md.b * gb.n2 + n2] > T.float32(0):
            for gg in T.serial(G):
                fill(gb.dq, md.q_off + (n2 * G + gg) * md.q_sn, md.q_ss, T.min(r0, md.sq),
                     T.min(r0 + POST_ROWS, md.sq), T.int64(D), NAN_ST, tx)
                if DPSE:
                    fill(gb.dpse, pse_region(spec, md, n2 * G + gg).base, pse_region(spec, md, n2 * G + gg).stride,
                         T.min(r0, pse_region(spec, md, n2 * G + gg).rows),
                         T.min(r0 + POST_ROWS, pse_region(spec, md, n2 * G + gg).rows),
                         pse_region(spec, md, n2 * G + gg).width, nan32(), tx)
            fill(gb.dk, md.k_off + n2 * md.k_sn, md.k_ss, T.min(r0, md.skv), T.min(r0 + POST_ROWS, md.skv),
                 T.int64(D), NAN_ST, tx)
            fill(gb.dv, md.v_off + n2 * md.v_sn, md.v_ss, T.min(r0, md.skv), T.min(r0 + POST_ROWS, md.skv),
                 T.int64(DV), NAN_ST, tx)
        elif gb.ip[I_DETERMINISTIC] == 0:
            for gg in T.serial(G):
                for kk in T.serial(_ceil(POST_ROWS * DP, NT)):
                    if T.And(T.And(kk * NT + tx < POST_ROWS * DP, r0 + (kk * NT + tx) // DP < md.sq),
                             (kk * NT + tx) % DP < D):
                        gb.dq[md.q_off + (n2 * G + gg) * md.q_sn + (r0 + (kk * NT + tx) // DP) * md.q_ss
                              + (kk * NT + tx) % DP] = dt.st_sat(gb.ws[gb.dq_acc + (
                                  md.row0 + (n2 * G + gg) * md.sq + r0 + (kk * NT + tx) // DP) * DP
                                  + (kk * NT + tx) % DP] * md.scale)

    @T.macro
    def pre_body(gb, bx, by, tx):
        batch_prologue(gb, _div32(bx, gb.n2), pre_task, ns(n2=_mod32(bx, gb.n2), tx=tx))

    @T.macro
    def post_body(gb, bx, by, tx):
        batch_prologue(gb, _div32(by, gb.n2), post_task, ns(n2=_mod32(by, gb.n2), tx=tx, rb=bx))

    @T.macro
    def tile_body(gb, bx, by, tx, dkdv_phase):
        ks = T.alloc_buffer((SH["ks"],), "float32", scope=smem_scope)
        vs = T.alloc_buffer((SH["vs"],), "float32", scope=smem_scope)
        qs = T.alloc_buffer((SH["qs"],), "float32", scope=smem_scope)
        dys = T.alloc_buffer((SH["dys"],), "float32", scope=smem_scope)
        ps = T.alloc_buffer((SH["ps"],), "float32", scope=smem_scope)
        dss = T.alloc_buffer((SH["dss"],), "float32", scope=smem_scope)
        es = T.alloc_buffer((SH.get("es", 1),), "float32", scope=smem_scope)
        rm = T.alloc_buffer((BM,), "float32", scope=smem_scope)
        rr = T.alloc_buffer((BM,), "float32", scope=smem_scope)
        rd = T.alloc_buffer((BM,), "float32", scope=smem_scope)
        tmp = T.alloc_buffer((5,), "float32", scope="local")
        if dkdv_phase:
            dka = T.alloc_buffer((EK,), "float32", scope="local")
            dva = T.alloc_buffer((EV,), "float32", scope="local")
            if SUM_B:
                for b in T.serial(gb.ip[I_B]):
                    batch_prologue(gb, b, kv_block, ns(n2=by, jb=bx, tx=tx, dka=dka, dva=dva, t=tmp,
                                                       sm=ns(ks=ks, vs=vs, qs=qs, dys=dys, ps=ps, dss=dss, es=es, rm=rm,
                                                             rr=rr, rd=rd)))
            else:
                batch_prologue(gb, _div32(by, gb.n2), kv_block,
                               ns(n2=_mod32(by, gb.n2), jb=bx, tx=tx, dka=dka, dva=dva, t=tmp,
                                  sm=ns(ks=ks, vs=vs, qs=qs, dys=dys, ps=ps, dss=dss, es=es, rm=rm, rr=rr, rd=rd)))
        else:
            dqa = T.alloc_buffer((EQ,), "float32", scope="local")
            batch_prologue(gb, _div32(by, gb.n2 * G), q_block,
                           ns(n=_mod32(by, gb.n2 * G), ib=bx, tx=tx, dqa=dqa, t=tmp,
                              sm=ns(ks=ks, vs=vs, qs=qs, dys=dys, ps=ps, dss=dss, es=es, rm=rm, rr=rr, rd=rd)))

    @T.macro
    def dkdv_body(gb, bx, by, tx):
        tile_body(gb, bx, by, tx, True)

    @T.macro
    def dq_body(gb, bx, by, tx):
        tile_body(gb, bx, by, tx, False)

    BODIES = {"pre": pre_body, "post": post_body, "dkdv": dkdv_body, "dq": dq_body}

    # ---- the four PrimFuncs (same ABI signature + grid extents) ----------------------------------------------
    def make(phase):
        phase_body = BODIES[phase]

        @T.prim_func
        def f(q_h: T.handle, k_h: T.handle, v_h: T.handle, dy_h: T.handle, o_h: T.handle,
              smax_h: T.handle, ssum_h: T.handle, pse_h: T.handle, mask_h: T.handle, drop_h: T.handle,
              bmeta_h: T.handle, iparams: T.Buffer((IPARAMS_LEN,), "int64"), fparams: T.Buffer((FPARAMS_LEN,), "float32"),
              dq_h: T.handle, dk_h: T.handle, dv_h: T.handle, dpse_h: T.handle, ws_h: T.handle,
              grid_x: T.int32, grid_y: T.int32):
            T.func_attr({"tirx.noalias": True})
            q = T.match_buffer(q_h, (T.int64(),), SD)
            k = T.match_buffer(k_h, (T.int64(),), SD)
            v = T.match_buffer(v_h, (T.int64(),), SD)
            dy = T.match_buffer(dy_h, (T.int64(),), SD)
            o = T.match_buffer(o_h, (T.int64(),), SD)
            smax = T.match_buffer(smax_h, (T.int64(),), "float32")
            ssum = T.match_buffer(ssum_h, (T.int64(),), "float32")
            pse = T.match_buffer(pse_h, (T.int64(),), PD)
            atten_mask = T.match_buffer(mask_h, (T.int64(),), "uint8")
            drop_mask = T.match_buffer(drop_h, (T.int64(),), "uint8")
            bmeta = T.match_buffer(bmeta_h, (T.int64(),), "int64")
            dq = T.match_buffer(dq_h, (T.int64(),), SD)
            dk = T.match_buffer(dk_h, (T.int64(),), SD)
            dv = T.match_buffer(dv_h, (T.int64(),), SD)
            dpse_acc = T.match_buffer(dpse_h, (T.int64(),), "float32")
            ws = T.match_buffer(ws_h, (T.int64(),), "float32")
            bx = T.launch_thread("blockIdx.x", grid_x)
            by = T.launch_thread("blockIdx.y", grid_y)
            tx = T.launch_thread("threadIdx.x", NT)
            n2s: T.let = iparams[I_N2]
            rows: T.let = iparams[abi.I_TOTAL_ROWS]
            flags: T.let = (rows + 15) // 16 * 16
            dq_acc: T.let = flags + (iparams[I_B] * n2s + 15) // 16 * 16
            phase_body(_gb(q, k, v, dy, o, smax, ssum, pse, atten_mask, drop_mask, bmeta, iparams, fparams, dq, dk, dv,
                           dpse_acc, ws, flags=flags, n2=n2s, dq_acc=dq_acc), T.Cast("int64", bx), T.Cast("int64", by), T.Cast("int64", tx))

        return drop_params(f, kernel_params(spec)).with_attr("global_symbol", f"{name}_{phase}")

    return {f"{name}_{ph}": make(ph) for ph in PHASES}


def grids(spec: KernelSpec, knobs, iparams) -> dict[str, tuple[int, int]]:
    """(grid_x, grid_y) of every phase for a call's iparams (host side)."""
    B, N2 = int(iparams[I_B]), int(iparams[I_N2])
    sq, skv = int(iparams[abi.I_MAX_SQ]), int(iparams[abi.I_MAX_SKV])
    tasks = B * N2
    return {"pre": (tasks, 1),
            "dkdv": (_ceil(skv, knobs.block_n), N2 if spec.dpse_sum_b else tasks),
            "dq": (_ceil(sq, knobs.block_m), tasks * spec.group),
            "post": (_ceil(max(sq, skv, 1), POST_ROWS), tasks)}
