"""The ascend-like backward: CANN's FAG structure (ASCEND_MODEL.md §1) as TIR whose buffers carry the AI
core's memory scopes and capacities, lowered through LLVM and run on the CPU (a functional simulation: the
numbers follow the NPU's precision pipeline; the time comes from pipeline_model.py, never from this run).

  SFMG pre-pass   per (b, n2) task: scan its inputs (non-finite -> poison flag), Di = rowsum(dY o O) -> GM ws;
                  zero the fp32 dQ/dK/dV accumulator slot(s)
  main            the valid work items (b -> n2 -> S2o -> g -> S1o; CV blocks the band rule leaves empty are
                  skipped) dealt in contiguous ranges to the cube cores; per item:
    Cube1         S = Q K^T and dP = dY V^T, base tile by base tile: GM -> L1 (MTE2) -> L0A/L0B (MTE1) -> mmad
                  into L0C (fp32) -> FixPipe to the core's GM hand-off slot (fp32, or rounded to the input dtype
                  with handoff_bytes = 2)
    Vector1       the two AIVs each take half the block's rows, in vec_rows x vec_cols sub-tiles through UB:
                  P from the stored stats, pse / masks / dropout, dS = P (dP - Di), dpse; P and dS rounded to the
                  input dtype, written back over S and dP in GM
    Cube2         dV += P^T dY, dK += dS^T Q, dQ += dS K through L1/L0 again; FixPipe adds into the fp32 GM slot
                  (one shared slot: atomic mode; the core's own slot: deterministic mode). With dkdv = "l1" the
                  block column's dK/dV stay in an L1 fp32 accumulator and are added to GM once per column.
  post pass       per task: dq = cast(scale * sum of slots), dk = cast(scale * ...), dv = cast(...) -- slots summed
                  in core order -- or NaN over every output of a poisoned task

K/V of a block column are loaded into L1 once per column when kv_resident, else streamed per base tile.
Double buffering (db_*) allocates that many buffers per scope and alternates them, as ping-pong code does; a
functional run executes the stages in order, so it changes which buffer holds what, not the result.

Deterministic vs atomic is a runtime flag (iparams slot I_DETERMINISTIC): `deterministic=True` of a call,
or the accumulate knob. Cores run in parallel threads in deterministic mode without dpse (each core owns
its slots); otherwise they run in core order, which is one legal order of the NPU's atomic adds."""
from __future__ import annotations

from ...core import abi
from ...core.abi import FPARAMS_LEN, I_B, I_N2, IPARAMS_LEN, STATS_LANES, pad16, param_names
from ...core.spec import KernelSpec
from ...kernels.common import dropout as cdrop
from ...kernels.common import mask as cmask
from ...kernels.common import softmax as csoft
from ...kernels.common.context import batch_prologue, head_context
from ...kernels.common.dtype import DType
from ...kernels.common.finite import nan32, sat, sat_keep_nan
from ...kernels.common.pse import pse_region, slope_of
from ...kernels.common.score import score_expr
from ...kernels.common.tir import T, ns
from ..llvm import microkernels as M  # the task scan and NaN fills of the poison rule (shared with llvm)
from . import workspace as W
from .workspace import I_DETERMINISTIC

SCOPES = ("local.L1", "local.L0A", "local.L0B", "local.L0C", "local.UB")
SCAN_VEC = 8


def _ceil(a, b):
    return (a + (b - 1)) // b


def _gb(q, k, v, dy, o, smax, ssum, pse, mask, drop, bm, ip, fp, dq, dk, dv, dpse, ws, **extra):
    """The kernel's global buffers as the record batch_prologue and the stage macros read (+ phase extras)."""
    return ns(q=q, k=k, v=v, dy=dy, o=o, smax=smax, ssum=ssum, pse=pse, mask=mask, drop=drop, bm=bm, ip=ip, fp=fp,
              dq=dq, dk=dk, dv=dv, dpse=dpse, ws=ws, **extra)


def make_bwd(spec: KernelSpec, knobs, machine: dict, name: str = "fag_bwd_ascend"):
    """The backward PrimFunc of `spec` under the ascend-like schedule `knobs` on `machine` (a dict)."""
    assert spec.direction == "bwd"
    CV1, CV2 = knobs.cv_s1, knobs.cv_s2
    BM, BN, BK = knobs.base_m, knobs.base_n, knobs.base_k
    VR, VC = knobs.vec_rows, knobs.vec_cols
    DB1, DB0, DBU, DBC = knobs.db_l1, knobs.db_l0, knobs.db_ub, knobs.db_l0c
    HALF = CV1 // 2
    NC = int(machine["aic_cores"])
    FR = int(machine["fractal"])
    KVRES = bool(knobs.kv_resident)
    DKDV_L1 = knobs.dkdv == "l1"
    D, DV, G = spec.d, spec.dv, spec.group
    DP, DVP = pad16(D), pad16(DV)
    dt = DType(spec.dtype)
    SD = dt.storage
    PD = spec.pse_storage_dtype
    LOWP = dt.lowp
    ROUND_HANDOFF = LOWP and knobs.handoff_bytes == 2
    DROP, DPSE, DPSE_MUL_SCALE = spec.dropout, spec.dpse, spec.pse_add_first
    CVF = CV1 * CV2
    BUF = core_buffers(spec, knobs)

    def al(x):  # extents the cube works on: the fractal's multiples
        return (x + (FR - 1)) // FR * FR

    # ---- the cube: C[mv x nv] = sum_k A(m, k) B(k, n), base tile by base tile ---------------------------
    def make_cube(a_ld, b_ld, b_in_l1: bool, sink):
        """a_ld(x, m, k) / b_ld(x, k, n): operand elements in the input's storage type; b_in_l1: B already
        sits in L1 (the resident K/V column), so it goes L1 -> L0B directly; sink(x, m, n, value): FixPipe."""

        @T.macro
        def cube(x, cb, mv, nv, kv):
            for mt in range(_ceil(mv, BM)):
                for nt in range(_ceil(nv, BN)):
                    mm: T.let = T.min(mv - mt * BM, BM)
                    nn: T.let = T.min(nv - nt * BN, BN)
                    pc: T.let = T.floormod(mt * _ceil(nv, BN) + nt, DBC)
                    for m in range(al(mm)):
                        for n in range(al(nn)):
                            cb.l0c[pc, m, n] = T.float32(0)
                    for kt in range(_ceil(kv, BK)):
                        kk: T.let = T.min(kv - kt * BK, BK)
                        p1: T.let = T.floormod(kt, DB1)
                        p0: T.let = T.floormod(kt, DB0)
                        # MTE2: GM -> L1 (zero beyond the valid extents: the cube multiplies whole fractals)
                        for m in range(al(mm)):
                            for k in range(al(kk)):
                                if m < mm and k < kk:
                                    cb.l1a[p1, m, k] = a_ld(x, mt * BM + m, kt * BK + k)
                                else:
                                    cb.l1a[p1, m, k] = T.Cast(SD, 0)
                        # MTE1: L1 -> L0A, and L1 (slice or resident column) -> L0B
                        for m in range(al(mm)):
                            for k in range(al(kk)):
                                cb.l0a[p0, m, k] = cb.l1a[p1, m, k]
                        for k in range(al(kk)):
                            for n in range(al(nn)):
                                if b_in_l1:
                                    if k < kk and n < nn:
                                        cb.l0b[p0, k, n] = b_ld(x, kt * BK + k, nt * BN + n)
                                    else:
                                        cb.l0b[p0, k, n] = T.Cast(SD, 0)
                                else:
                                    if k < kk and n < nn:
                                        cb.l1b[p1, k, n] = b_ld(x, kt * BK + k, nt * BN + n)
                                    else:
                                        cb.l1b[p1, k, n] = T.Cast(SD, 0)
                                    cb.l0b[p0, k, n] = cb.l1b[p1, k, n]
                        # M: mmad, fp32 accumulation in L0C
                        for m in range(al(mm)):
                            for n in range(al(nn)):
                                for k in range(al(kk)):
                                    cb.l0c[pc, m, n] = cb.l0c[pc, m, n] + dt.widen(cb.l0a[p0, m, k]) * dt.widen(cb.l0b[p0, k, n])
                    # FIX: L0C -> destination
                    for m in range(mm):
                        for n in range(nn):
                            sink(x, mt * BM + m, nt * BN + n, cb.l0c[pc, m, n])

        return cube

    def hand(v):
        return dt.rnd(v) if ROUND_HANDOFF else v

    # operands (x: the item record)
    def q_ld(x, m, k):
        return x.gb.q[x.q_base + m * x.md.q_ss + k]

    def dy_ld(x, m, k):
        return x.gb.dy[x.o_base + m * x.md.o_ss + k]

    def k_row(x, j, d):  # K[j0 + j, d]
        if KVRES:
            return x.kres[j, d]
        return x.gb.k[x.k_base + j * x.md.k_ss + d]

    def v_row(x, j, d):
        if KVRES:
            return x.kres[j, DP + d]
        return x.gb.v[x.v_base + j * x.md.v_ss + d]

    def p_at(x, i, j):
        return dt.st(x.gb.ws[x.cv + i * CV2 + j])

    def ds_at(x, i, j):
        return dt.st(x.gb.ws[x.cv + CVF + i * CV2 + j])

    @T.macro
    def sink_s(x, m, n, val):
        x.gb.ws[x.cv + m * CV2 + n] = hand(val)

    @T.macro
    def sink_dp(x, m, n, val):
        x.gb.ws[x.cv + CVF + m * CV2 + n] = hand(val)

    @T.macro
    def sink_dv(x, m, n, val):
        if DKDV_L1:
            x.dkdv[m, DP + n] = x.dkdv[m, DP + n] + val
        else:
            x.gb.ws[x.dv_acc + m * DVP + n] = x.gb.ws[x.dv_acc + m * DVP + n] + val

    @T.macro
    def sink_dk(x, m, n, val):
        if DKDV_L1:
            x.dkdv[m, n] = x.dkdv[m, n] + val
        else:
            x.gb.ws[x.dk_acc + m * DP + n] = x.gb.ws[x.dk_acc + m * DP + n] + val

    @T.macro
    def sink_dq(x, m, n, val):
        x.gb.ws[x.dq_acc + m * DP + n] = x.gb.ws[x.dq_acc + m * DP + n] + val

    cube_s = make_cube(q_ld, lambda x, k, n: k_row(x, n, k), KVRES, sink_s)
    cube_dp = make_cube(dy_ld, lambda x, k, n: v_row(x, n, k), KVRES, sink_dp)
    cube_dv = make_cube(lambda x, m, k: p_at(x, k, m), lambda x, k, n: dy_ld(x, k, n), False, sink_dv)
    cube_dk = make_cube(lambda x, m, k: ds_at(x, k, m), lambda x, k, n: q_ld(x, k, n), False, sink_dk)
    cube_dq = make_cube(lambda x, m, k: ds_at(x, m, k), lambda x, k, n: k_row(x, k, n), KVRES, sink_dq)

    # ---- Vector1: one AIV's element pass over a UB sub-tile -------------------------------------------
    @T.macro
    def cell(c, u, i, j):
        u.s[u.p, i, j] = score_expr(c, u.s[u.p, i, j], u.i0 + i, u.j0 + j, spec.band)
        u.s[u.p, i, j] = csoft.fexp(u.s[u.p, i, j] - u.rm[i]) * u.rr[i]
        if DROP:
            u.mk[0] = cdrop.drop_keep_factor(c, u.i0 + i, u.j0 + j)
            u.dp[u.p, i, j] = u.s[u.p, i, j] * (u.dp[u.p, i, j] * u.mk[0] - u.rd[i])
        else:
            u.dp[u.p, i, j] = u.s[u.p, i, j] * (u.dp[u.p, i, j] - u.rd[i])
        if DPSE:
            u.dp[u.p, i, j] = sat(u.dp[u.p, i, j])
            if DPSE_MUL_SCALE:
                c.dpse[c.pse_head + (u.i0 + i) * c.p_si + u.j0 + j] = sat_keep_nan(
                    c.dpse[c.pse_head + (u.i0 + i) * c.p_si + u.j0 + j] + u.dp[u.p, i, j] * c.scale)
            else:
                c.dpse[c.pse_head + (u.i0 + i) * c.p_si + u.j0 + j] = sat_keep_nan(
                    c.dpse[c.pse_head + (u.i0 + i) * c.p_si + u.j0 + j] + u.dp[u.p, i, j])
        if LOWP:
            u.dp[u.p, i, j] = dt.rnd(u.dp[u.p, i, j])
        if DROP:
            u.s[u.p, i, j] = u.s[u.p, i, j] * u.mk[0]
        if LOWP:
            u.s[u.p, i, j] = dt.rnd(u.s[u.p, i, j])

    @T.macro
    def vector1(x, vb, ni, nj):
        for h in range(2):  # AIV 0 and AIV 1: half the rows each
            r_lo: T.let = T.Cast("int64", h * HALF)
            r_hi: T.let = T.min(T.Cast("int64", (h + 1) * HALF), ni)
            for rt in range(_ceil(T.max(r_hi - r_lo, T.int64(0)), VR)):
                for ct in range(_ceil(nj, VC)):
                    p: T.let = T.floormod(rt * _ceil(nj, VC) + ct, DBU)
                    r0: T.let = r_lo + rt * VR
                    c0: T.let = ct * VC
                    rows: T.let = T.min(r_hi - r0, VR)
                    cols: T.let = T.min(nj - c0, VC)
                    # MTE2: the row statistics and the S / dP sub-tile, GM -> UB
                    for i in range(rows):
                        vb.rm[i] = csoft.row_max_for_p(x.gb.smax[(x.rowbase + x.i0 + r0 + i) * STATS_LANES],
                                                       x.gb.ssum[(x.rowbase + x.i0 + r0 + i) * STATS_LANES])
                        vb.rr[i] = T.min(csoft.row_rsum_for_p(x.gb.smax[(x.rowbase + x.i0 + r0 + i) * STATS_LANES],
                                                              x.gb.ssum[(x.rowbase + x.i0 + r0 + i) * STATS_LANES]),
                                         T.float32(csoft.RR_MAX))
                        vb.rd[i] = x.gb.ws[x.rowbase + x.i0 + r0 + i]
                        for j in range(cols):
                            vb.s[p, i, j] = x.gb.ws[x.cv + (r0 + i) * CV2 + c0 + j]
                            vb.dp[p, i, j] = x.gb.ws[x.cv + CVF + (r0 + i) * CV2 + c0 + j]
                    # V: the element pass
                    for i in range(rows):
                        for j in range(cols):
                            cell(x.c, ns(s=vb.s, dp=vb.dp, p=p, rm=vb.rm, rr=vb.rr, rd=vb.rd, mk=vb.mk,
                                         i0=x.i0 + r0, j0=x.j0 + c0), i, j)
                    # MTE3: P and dS, UB -> GM (over S and dP)
                    for i in range(rows):
                        for j in range(cols):
                            x.gb.ws[x.cv + (r0 + i) * CV2 + c0 + j] = vb.s[p, i, j]
                            x.gb.ws[x.cv + CVF + (r0 + i) * CV2 + c0 + j] = vb.dp[p, i, j]

    # ---- the SFMG pre-pass (per task) -------------------------------------------------------------------
    scan = M.make_task_scan(spec, dt, SCAN_VEC)

    @T.macro
    def pre_task(gb, md, n2):
        red = T.decl_buffer((SCAN_VEC,), "float32")
        sc = T.decl_buffer((1,), "float32")
        scan.start(red)
        for g in range(G):
            scan.q_rows(red, gb, md, n2 * G + g)
            scan.grad_rows(red, gb, md, n2 * G + g)
            scan.pse_block(red, gb, md, n2 * G + g)
        scan.kv_rows(red, gb, md, n2)
        scan.total(red, sc)
        gb.ws[gb.flags + md.b * gb.n2 + n2] = sc[0]
        for g in range(G):
            for i in range(md.sq):
                sc[0] = T.float32(0)
                for c in range(DV):
                    sc[0] = sc[0] + dt.ld(gb.dy, md.o_off + (n2 * G + g) * md.o_sn + i * md.o_ss + c) \
                        * dt.ld(gb.o, md.o_off + (n2 * G + g) * md.o_sn + i * md.o_ss + c)
                gb.ws[md.row0 + (n2 * G + g) * md.sq + i] = sat(sc[0])

    # ---- the post pass (per task) -------------------------------------------------------------------------
    fill_d = M.make_fill_rows(D, SCAN_VEC)
    fill_dv = M.make_fill_rows(DV, SCAN_VEC)

    @T.macro
    def post_task(gb, md, n2):
        sc = T.decl_buffer((1,), "float32")
        kvrow0: T.let = (md.b * gb.n2 + n2) * gb.max_skv
        if gb.ws[gb.flags + md.b * gb.n2 + n2] > T.float32(0):
            for g in range(G):
                fill_d(gb.dq, md.q_off + (n2 * G + g) * md.q_sn, md.q_ss, md.sq, dt.st(nan32()))
                if DPSE:
                    M.fill_rows_dyn(gb.dpse, pse_region(spec, md, n2 * G + g).base,
                                    pse_region(spec, md, n2 * G + g).stride, pse_region(spec, md, n2 * G + g).rows,
                                    pse_region(spec, md, n2 * G + g).width, nan32())
            fill_d(gb.dk, md.k_off + n2 * md.k_sn, md.k_ss, md.skv, dt.st(nan32()))
            fill_dv(gb.dv, md.v_off + n2 * md.v_sn, md.v_ss, md.skv, dt.st(nan32()))
        else:
            for g in range(G):
                for i in range(md.sq):
                    for c in range(D):
                        sc[0] = T.float32(0)
                        for s in range(gb.nslots):
                            sc[0] = sc[0] + gb.ws[gb.slots + s * gb.slot + (md.row0 + (n2 * G + g) * md.sq + i) * DP + c]
                        gb.dq[md.q_off + (n2 * G + g) * md.q_sn + i * md.q_ss + c] = dt.st_sat(sc[0] * md.scale)
            for j in range(md.skv):
                for c in range(D):
                    sc[0] = T.float32(0)
                    for s in range(gb.nslots):
                        sc[0] = sc[0] + gb.ws[gb.slots + s * gb.slot + gb.dk_off + (kvrow0 + j) * DP + c]
                    gb.dk[md.k_off + n2 * md.k_sn + j * md.k_ss + c] = dt.st_sat(sc[0] * md.scale)
                for c in range(DV):
                    sc[0] = T.float32(0)
                    for s in range(gb.nslots):
                        sc[0] = sc[0] + gb.ws[gb.slots + s * gb.slot + gb.dv_off + (kvrow0 + j) * DVP + c]
                    gb.dv[md.v_off + n2 * md.v_sn + j * md.v_ss + c] = dt.st_sat(sc[0])

    # ---- work items: count, deal, run -------------------------------------------------------------------
    @T.macro
    def count_batch(gb, md, cnt):
        nkb: T.let = _ceil(md.skv, CV2)
        nqb: T.let = _ceil(md.sq, CV1)
        for n2 in range(gb.n2):
            for jb in range(nkb):
                skip: T.let = cmask.skip_tiles(spec.band, md.tile_skip, jb * CV2, md.prefix)
                lo: T.let = cmask.q_block_lo(jb * CV2, md.nxt, CV1, skip)
                hi: T.let = cmask.q_block_hi(jb * CV2, T.min(md.skv - jb * CV2, T.int64(CV2)), md.sq, nqb, CV1,
                                             md.pre, md.nxt, skip)
                cnt[0] = cnt[0] + G * T.max(hi - lo, T.int64(0))

    @T.macro
    def run_item(x, cb, vb, ni, nj):
        # Cube1
        cube_s(x, cb, ni, nj, T.int64(D))
        cube_dp(x, cb, ni, nj, T.int64(DV))
        # Vector1
        vector1(x, vb, ni, nj)
        # Cube2
        cube_dv(x, cb, nj, T.int64(DV), ni)
        cube_dk(x, cb, nj, T.int64(D), ni)
        cube_dq(x, cb, ni, T.int64(D), nj)

    @T.macro
    def item(gb, md, cb, vb, n2, g, ib, jb, cvb, dkdv, kvrow0):
        n: T.let = n2 * G + g
        i0: T.let = ib * CV1
        j0: T.let = jb * CV2
        ni: T.let = T.min(md.sq - i0, T.int64(CV1))
        nj: T.let = T.min(md.skv - j0, T.int64(CV2))
        rowbase: T.let = md.row0 + n * md.sq
        slope: T.let = slope_of(spec, gb.pse, md.pse_off + n * md.p_sn)
        run_item(ns(gb=gb, md=md, c=head_context(spec, dt, gb, md, n, slope), cv=cvb, kres=cb.kres, dkdv=dkdv,
                    q_base=md.q_off + n * md.q_sn + i0 * md.q_ss, o_base=md.o_off + n * md.o_sn + i0 * md.o_ss,
                    k_base=md.k_off + n2 * md.k_sn + j0 * md.k_ss, v_base=md.v_off + n2 * md.v_sn + j0 * md.v_ss,
                    rowbase=rowbase, i0=i0, j0=j0,
                    dq_acc=gb.slot_base + (rowbase + i0) * DP,
                    dk_acc=gb.slot_base + gb.dk_off + (kvrow0 + j0) * DP,
                    dv_acc=gb.slot_base + gb.dv_off + (kvrow0 + j0) * DVP), cb, vb, ni, nj)

    @T.macro
    def core_batch(gb, md, core):
        # per core: its on-chip buffers (scopes and capacities of the AI core)
        l1a = T.decl_buffer(BUF["l1a"][0], BUF["l1a"][1], scope=BUF["l1a"][2])
        l1b = T.decl_buffer(BUF["l1b"][0], BUF["l1b"][1], scope=BUF["l1b"][2])
        kres = T.decl_buffer(BUF["kres"][0], BUF["kres"][1], scope=BUF["kres"][2])
        dkdv = T.decl_buffer(BUF["dkdv"][0], BUF["dkdv"][1], scope=BUF["dkdv"][2])
        l0a = T.decl_buffer(BUF["l0a"][0], BUF["l0a"][1], scope=BUF["l0a"][2])
        l0b = T.decl_buffer(BUF["l0b"][0], BUF["l0b"][1], scope=BUF["l0b"][2])
        l0c = T.decl_buffer(BUF["l0c"][0], BUF["l0c"][1], scope=BUF["l0c"][2])
        us = T.decl_buffer(BUF["us"][0], BUF["us"][1], scope=BUF["us"][2])
        udp = T.decl_buffer(BUF["udp"][0], BUF["udp"][1], scope=BUF["udp"][2])
        urm = T.decl_buffer(BUF["urm"][0], BUF["urm"][1], scope=BUF["urm"][2])
        urr = T.decl_buffer(BUF["urr"][0], BUF["urr"][1], scope=BUF["urr"][2])
        urd = T.decl_buffer(BUF["urd"][0], BUF["urd"][1], scope=BUF["urd"][2])
        umk = T.decl_buffer(BUF["umk"][0], BUF["umk"][1], scope=BUF["umk"][2])
        cvb: T.let = gb.cv0 + core * 2 * CVF
        nkb: T.let = _ceil(md.skv, CV2)
        nqb: T.let = _ceil(md.sq, CV1)
        for n2 in range(gb.n2):
            kvrow0: T.let = (md.b * gb.n2 + n2) * gb.max_skv
            live: T.let = gb.ws[gb.flags + md.b * gb.n2 + n2] <= T.float32(0)
            for jb in range(nkb):
                j0: T.let = jb * CV2
                nj: T.let = T.min(md.skv - j0, T.int64(CV2))
                skip: T.let = cmask.skip_tiles(spec.band, md.tile_skip, j0, md.prefix)
                lo: T.let = cmask.q_block_lo(j0, md.nxt, CV1, skip)
                hi: T.let = T.max(cmask.q_block_hi(j0, nj, md.sq, nqb, CV1, md.pre, md.nxt, skip), lo)
                # this column's items are [base, base + G*(hi-lo)) in dealing order; the core owns [start, end)
                base: T.let = gb.cnt[0]
                first: T.let = T.max(gb.start - base, T.int64(0))
                last: T.let = T.min(gb.end - base, G * (hi - lo))
                if T.And(live, first < last):
                    if KVRES:  # the column's K and V, GM -> L1 once
                        for j in range(nj):
                            for d in range(D):
                                kres[j, d] = gb.k[md.k_off + n2 * md.k_sn + (j0 + j) * md.k_ss + d]
                            for d in range(DV):
                                kres[j, DP + d] = gb.v[md.v_off + n2 * md.v_sn + (j0 + j) * md.v_ss + d]
                    if DKDV_L1:
                        for j in range(CV2):
                            for d in range(DP + DVP):
                                dkdv[j, d] = T.float32(0)
                    for t in range(first, last):
                        item(gb, md, ns(l1a=l1a, l1b=l1b, kres=kres, l0a=l0a, l0b=l0b, l0c=l0c),
                             ns(s=us, dp=udp, rm=urm, rr=urr, rd=urd, mk=umk),
                             n2, t // (hi - lo), lo + t % (hi - lo), jb, cvb, dkdv, kvrow0)
                    if DKDV_L1:  # the column's dK / dV, L1 -> GM once
                        for j in range(nj):
                            for d in range(D):
                                gb.ws[gb.slot_base + gb.dk_off + (kvrow0 + j0 + j) * DP + d] = \
                                    gb.ws[gb.slot_base + gb.dk_off + (kvrow0 + j0 + j) * DP + d] + dkdv[j, d]
                            for d in range(DV):
                                gb.ws[gb.slot_base + gb.dv_off + (kvrow0 + j0 + j) * DVP + d] = \
                                    gb.ws[gb.slot_base + gb.dv_off + (kvrow0 + j0 + j) * DVP + d] + dkdv[j, DP + d]
                gb.cnt[0] = base + G * (hi - lo)

    @T.prim_func
    def fag_bwd(q_h: T.handle, k_h: T.handle, v_h: T.handle, dy_h: T.handle, o_h: T.handle,
                smax_h: T.handle, ssum_h: T.handle, pse_h: T.handle, mask_h: T.handle, drop_h: T.handle,
                bmeta_h: T.handle, iparams: T.Buffer((IPARAMS_LEN,), "int64"), fparams: T.Buffer((FPARAMS_LEN,), "float32"),
                dq_h: T.handle, dk_h: T.handle, dv_h: T.handle, dpse_h: T.handle, ws_h: T.handle):
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
        nb: T.let = iparams[I_B]
        n2s: T.let = iparams[I_N2]
        det: T.let = iparams[I_DETERMINISTIC] != 0
        rows: T.let = iparams[abi.I_TOTAL_ROWS]
        max_skv: T.let = iparams[abi.I_MAX_SKV]
        kv_rows: T.let = nb * n2s * max_skv
        nslots: T.let = T.Select(det, T.int64(NC), T.int64(1))
        slot: T.let = W.slot_floats(rows, kv_rows, DP, DVP)
        flags: T.let = (rows + 15) // 16 * 16
        slots0: T.let = flags + (nb * n2s + 15) // 16 * 16
        cv0: T.let = slots0 + nslots * slot
        # SFMG pre-pass: poison flags and Di per task; the accumulator slot(s) zeroed
        for tk in T.parallel(nb * n2s):
            batch_prologue(_gb(q, k, v, dy, o, smax, ssum, pse, atten_mask, drop_mask, bmeta, iparams, fparams, dq, dk,
                               dv, dpse_acc, ws, flags=flags, n2=n2s), tk // n2s, pre_task, tk % n2s)
        for z in T.parallel(nslots * slot // 16):
            for e in T.vectorized(16):
                ws[slots0 + z * 16 + e] = T.float32(0)
        # main: count the valid items, deal contiguous ranges to the cube cores, run them
        total = T.decl_buffer((1,), "int64")
        total[0] = T.int64(0)
        for b in range(nb):
            batch_prologue(ns(bm=bmeta, ip=iparams, fp=fparams, n2=n2s), b, count_batch, total)
        per: T.let = (total[0] + (NC - 1)) // NC
        par: T.let = T.And(det, T.bool(not DPSE))
        for cp in T.parallel(T.Select(par, T.int64(NC), T.int64(1))):
            for cs in range(T.Select(par, T.int64(1), T.int64(NC))):
                cnt = T.decl_buffer((1,), "int64")
                cnt[0] = T.int64(0)
                for b in range(nb):
                    batch_prologue(_gb(q, k, v, dy, o, smax, ssum, pse, atten_mask, drop_mask, bmeta, iparams, fparams,
                                       dq, dk, dv, dpse_acc, ws, flags=flags, n2=n2s, max_skv=max_skv, cnt=cnt,
                                       start=(cp + cs) * per, end=(cp + cs + 1) * per, cv0=cv0,
                                       slot_base=slots0 + T.Select(det, cp + cs, T.int64(0)) * slot,
                                       dk_off=rows * DP, dv_off=rows * DP + kv_rows * DP),
                                   b, core_batch, cp + cs)
        # post pass: sum the slots in core order, scale, cast (or poison)
        for tk in T.parallel(nb * n2s):
            batch_prologue(_gb(q, k, v, dy, o, smax, ssum, pse, atten_mask, drop_mask, bmeta, iparams, fparams, dq, dk,
                               dv, dpse_acc, ws, flags=flags, n2=n2s, max_skv=max_skv, nslots=nslots,
                               slots=slots0, slot=slot, dk_off=rows * DP, dv_off=rows * DP + kv_rows * DP),
                           tk // n2s, post_task, tk % n2s)

    return M.drop_params(fag_bwd, param_names(spec)).with_attr("global_symbol", name)


def core_buffers(spec: KernelSpec, knobs) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """Every on-chip buffer one core declares: {name: (shape, dtype, scope)}. make_bwd declares exactly
    these (so the capacity check below sees what the kernel allocates)."""
    dp, dvp = pad16(spec.d), pad16(spec.dv)
    sd = DType(spec.dtype).storage
    k = knobs
    return {
        "l1a": ((k.db_l1, k.base_m, k.base_k), sd, "local.L1"),
        "l1b": ((k.db_l1, k.base_k, k.base_n), sd, "local.L1"),
        "kres": ((k.cv_s2 if k.kv_resident else 1, dp + dvp), sd, "local.L1"),
        "dkdv": ((k.cv_s2 if k.dkdv == "l1" else 1, dp + dvp), "float32", "local.L1"),
        "l0a": ((k.db_l0, k.base_m, k.base_k), sd, "local.L0A"),
        "l0b": ((k.db_l0, k.base_k, k.base_n), sd, "local.L0B"),
        "l0c": ((k.db_l0c, k.base_m, k.base_n), "float32", "local.L0C"),
        "us": ((k.db_ub, k.vec_rows, k.vec_cols), "float32", "local.UB"),
        "udp": ((k.db_ub, k.vec_rows, k.vec_cols), "float32", "local.UB"),
        "urm": ((k.vec_rows,), "float32", "local.UB"),
        "urr": ((k.vec_rows,), "float32", "local.UB"),
        "urd": ((k.vec_rows,), "float32", "local.UB"),
        "umk": ((1,), "float32", "local.UB"),
    }


_BYTES = {"float32": 4, "float16": 2, "uint16": 2}
SCOPE_CAPACITY = {"local.L1": "l1_bytes", "local.L0A": "l0a_bytes", "local.L0B": "l0b_bytes",
                  "local.L0C": "l0c_bytes", "local.UB": "ub_usable_bytes"}


def scope_bytes(spec: KernelSpec, knobs) -> dict[str, int]:
    """Bytes the kernel allocates per AI-core scope (one core / one AIV)."""
    out = {s: 0 for s in SCOPES}
    for shape, dtype, scope in core_buffers(spec, knobs).values():
        n = 1
        for e in shape:
            n *= e
        out[scope] += n * _BYTES[dtype]
    return out


def capacity_problems(spec: KernelSpec, knobs, machine: dict) -> list[str]:
    """Scopes whose allocations exceed the machine's capacity ([] if every buffer fits)."""
    return [f"{scope} allocates {used} B > {machine[SCOPE_CAPACITY[scope]]} B"
            for scope, used in scope_bytes(spec, knobs).items() if used > machine[SCOPE_CAPACITY[scope]]]
