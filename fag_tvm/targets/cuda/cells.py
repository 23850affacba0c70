"""The softmax gradient of a tile (SPEC §2-§3): from the thread's S and dP cells, P (rebuilt from the stored
stats, masks, pse, dropout) and dS = P o (dP - Di), with P and dS rounded to the input dtype as CANN hands
them to the second matmuls, and the fp32 dpse value of every cell. Both the dK/dV kernel and the
deterministic dQ kernel call the same macro, so their P and dS are bitwise equal."""
from __future__ import annotations

from ...kernels.common import dropout as cdrop
from ...kernels.common import softmax as csoft
from ...kernels.common.finite import sat
from ...kernels.common.score import score_expr
from ...kernels.common.tir import T


def make_tile_grad(spec, dt, g, with_dpse: bool):
    """cells(x, sm, t, tx): S = Q_i . K_j and dP = dY_i . V_j from the shared tiles, then P -> sm.ps,
    dS -> sm.dss (and fp32 dpse -> sm.es when with_dpse) for the thread's cells; cells outside the valid
    [ni, nj] corner get exact zeros (and are never read from global memory: masks, pse and dropout bits are
    only touched for valid cells). t: a local scratch of 5 floats."""
    EPT = g.BM * g.BN // g.NT
    DROP, LOWP = spec.dropout, dt.lowp

    @T.macro
    def cells(x, sm, t, tx):
        for k in T.serial(EPT, annotations={"pragma_unroll": 1}):  # one cell at a time: registers stay for the accumulators
            if T.And((k * g.NT + tx) // g.BN < x.ni, (k * g.NT + tx) % g.BN < x.nj):
                # t[3] = S, t[4] = dP (raw dots), t[0] = P, t[1] = dS, t[2] = dropout keep factor
                t[3] = T.float32(0)
                for d in T.serial(g.D):
                    t[3] = t[3] + sm.qs[(k * g.NT + tx) // g.BN * g.KLD + d] * sm.ks[(k * g.NT + tx) % g.BN * g.KLD + d]
                t[4] = T.float32(0)
                for d in T.serial(g.DV):
                    t[4] = t[4] + sm.dys[(k * g.NT + tx) // g.BN * g.VLD + d] * sm.vs[(k * g.NT + tx) % g.BN * g.VLD + d]
                t[3] = score_expr(x.c, t[3], x.i0 + (k * g.NT + tx) // g.BN, x.j0 + (k * g.NT + tx) % g.BN, spec.band)
                t[3] = t[3] - sm.rm[(k * g.NT + tx) // g.BN]
                t[0] = csoft.fexp(t[3]) * sm.rr[(k * g.NT + tx) // g.BN]
                if DROP:
                    t[2] = cdrop.drop_keep_factor(x.c, x.i0 + (k * g.NT + tx) // g.BN, x.j0 + (k * g.NT + tx) % g.BN)
                    t[1] = t[0] * (t[4] * t[2] - sm.rd[(k * g.NT + tx) // g.BN])
                else:
                    t[1] = t[0] * (t[4] - sm.rd[(k * g.NT + tx) // g.BN])
                if with_dpse:
                    t[1] = sat(t[1])
                    if spec.pse_add_first:
                        sm.es[(k * g.NT + tx) // g.BN * g.PLD + (k * g.NT + tx) % g.BN] = t[1] * x.c.scale
                    else:
                        sm.es[(k * g.NT + tx) // g.BN * g.PLD + (k * g.NT + tx) % g.BN] = t[1]
                if DROP:
                    t[0] = t[0] * t[2]
                if LOWP:
                    t[0] = dt.rnd(t[0])
                    t[1] = dt.rnd(t[1])
                sm.ps[(k * g.NT + tx) // g.BN * g.PLD + (k * g.NT + tx) % g.BN] = t[0]
                sm.dss[(k * g.NT + tx) // g.BN * g.PLD + (k * g.NT + tx) % g.BN] = t[1]
            else:
                sm.ps[(k * g.NT + tx) // g.BN * g.PLD + (k * g.NT + tx) % g.BN] = T.float32(0)
                sm.dss[(k * g.NT + tx) // g.BN * g.PLD + (k * g.NT + tx) % g.BN] = T.float32(0)
                if with_dpse:
                    sm.es[(k * g.NT + tx) // g.BN * g.PLD + (k * g.NT + tx) % g.BN] = T.float32(0)

    return cells
