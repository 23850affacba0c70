"""Kernel-level tests of the LLVM fwd/bwd kernels against the ABI (fag_tvm/core/ABI.md).

bmeta / iparams / fparams are built BY HAND here (independently of fag_tvm.core.abi) for BNSD, BSH
and TND-like layouts, and the results are compared with a tiny dense float64 NumPy implementation
written in this file (independent of the kernels and of fag_tvm.reference). Inputs are random (never
zero), rounded to the kernel dtype first; outputs and the workspace are pre-filled with NaN so an
element the kernel forgets to write fails the test.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from fag_tvm import jit
from fag_tvm.core.buffers import aligned_empty
from fag_tvm.core.spec import KernelSpec
from fag_tvm.targets.llvm import TARGET as LLVM
from fag_tvm.targets.llvm.workspace import workspace_floats

FLT_MAX = float(np.finfo(np.float32).max)
I32MAX = 2147483647
NP_DT = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
TOL = {"float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}

# ------------------------------------------------------------------------------------------------
# problem construction (hand-made ABI metadata)


class Problem:
    """Per-batch dense float64 tensors (already rounded to dtype) + their flat ABI encoding."""

    def __init__(self, seed=0, *, layout="BNSD", dtype="float32", N1=2, N2=None, seqs=((1, 48, 48),),
                 D=16, Dv=None, band=None, full_mask=None, pse=None, pse_add_first=True, keep=1.0,
                 scale=None, invalid_rows=False, tile_skip=1, q_start=0, kv_start=0):
        rng = np.random.default_rng(seed)
        # seqs: for BNSD/BSH ((B, Sq, Skv),); for TND a list of (Sq_b, Skv_b)
        if layout == "TND":
            self.lens = [tuple(s) for s in seqs]
        else:
            (B, S1, S2), = seqs
            self.lens = [(S1, S2)] * B
        self.B = B = len(self.lens)
        self.layout, self.dtype = layout, dtype
        self.N1, self.N2 = N1, (N2 or N1)
        self.G = self.N1 // self.N2
        self.D, self.Dv = D, (Dv or D)
        self.scale = scale if scale is not None else 1.0 / np.sqrt(D)
        self.keep = keep
        self.invalid_rows = invalid_rows
        self.pse_kind = pse
        self.pse_add_first = pse_add_first
        self.q_start, self.kv_start = q_start, kv_start
        dt = NP_DT[dtype]

        def rnd(shape, lo=-1.0, hi=1.0):
            x = rng.uniform(lo, hi, shape)
            x = np.where(np.abs(x) < 0.05, 0.37, x)  # never zero
            return x.astype(dt).astype(np.float64)

        N1, N2, Dv = self.N1, self.N2, self.Dv
        self.q = [rnd((N1, s1, D)) for s1, _ in self.lens]
        self.k = [rnd((N2, s2, D)) for _, s2 in self.lens]
        self.v = [rnd((N2, s2, Dv)) for _, s2 in self.lens]
        self.dy = [rnd((N1, s1, Dv)) for s1, _ in self.lens]

        # band rule per batch (pre, next, prefix)
        self.band = band
        if band is not None:
            self.bandv = [band(b, s1, s2) if callable(band) else band for b, (s1, s2) in enumerate(self.lens)]
        else:
            self.bandv = [(I32MAX, I32MAX, 0)] * B

        # full mask (random, but every row keeps its first band-visible cell, so no row is fully masked)
        self.full_mask = full_mask
        S1m = max(s for s, _ in self.lens)
        S2m = max(s for _, s in self.lens)
        self.S1m, self.S2m = S1m, S2m

        def first_visible(b, s1, s2):
            pre, nxt, prefix = self.bandv[b]
            i = np.arange(s1)[:, None]
            j = np.arange(s2)[None, :]
            vis = ((j - i <= nxt) & (i - j <= pre)) | (j < prefix)
            return np.argmax(vis, axis=1), vis.any(axis=1)

        if full_mask == "SS":
            m = rng.random((S1m, S2m)) < 0.25
            for b, (s1, s2) in enumerate(self.lens):
                if s1 and s2:
                    jf, ok = first_visible(b, s1, s2)
                    m[np.arange(s1)[ok], jf[ok]] = False
            self.mask_flat = m.astype(np.uint8).reshape(-1)
            self.mask = [np.broadcast_to(m[:s1, :s2], (N1, s1, s2)) for s1, s2 in self.lens]
        elif full_mask == "BNSS":
            assert layout != "TND"
            S1, S2 = self.lens[0]
            m = rng.random((B, N1, S1, S2)) < 0.25
            for b in range(B):
                jf, ok = first_visible(b, S1, S2)
                m[b][:, np.arange(S1)[ok], jf[ok]] = False
            self.mask_flat = m.astype(np.uint8).reshape(-1)
            self.mask = [m[b] for b in range(B)]
        else:
            self.mask = [np.zeros((N1, s1, s2), bool) for s1, s2 in self.lens]

        # dropout bits (LSB-first over the linear element index)
        self.drop = None
        if keep < 1.0:
            total = N1 * sum(s1 * s2 for s1, s2 in self.lens)
            bits = rng.random(total) < keep
            self.drop_flat = np.packbits(bits.astype(np.uint8), bitorder="little")
            self.drop, e = [], 0
            for s1, s2 in self.lens:
                self.drop.append(bits[e:e + N1 * s1 * s2].reshape(N1, s1, s2))
                e += N1 * s1 * s2

        # pse
        self.pse = [np.zeros((N1, s1, s2)) for s1, s2 in self.lens]
        self.pse_flat = None
        self.pse_meta = [(0, 0, 0)] * B
        self.alibi = (0, 0, 0)
        if pse in ("BNSS", "1NSS", "BN1S"):
            S1, S2 = self.lens[0]
            shp = {"BNSS": (B, N1, S1, S2), "1NSS": (1, N1, S1, S2), "BN1S": (B, N1, 1, S2)}[pse]
            p = rnd(shp, -2, 2)
            self.pse_flat = p.astype(dt).reshape(-1)
            self.pse_shape = shp
            for b in range(B):
                pb = p[0] if pse == "1NSS" else p[b]
                self.pse[b] = np.broadcast_to(pb, (N1, S1, S2)).copy()
            self.pse_meta = [{"BNSS": (b * N1 * S1 * S2, S1 * S2, S2), "1NSS": (0, S1 * S2, S2),
                              "BN1S": (b * N1 * S2, S2, 0)}[pse] for b in range(B)]
        elif pse == "TND_BNSS":
            parts, off, self.pse_meta = [], 0, []
            for b, (s1, s2) in enumerate(self.lens):
                p = rnd((N1, s1, s2), -2, 2)
                parts.append(p.reshape(-1))
                self.pse[b] = p
                self.pse_meta.append((off, s1 * s2, s2))
                off += N1 * s1 * s2
            self.pse_flat = np.concatenate(parts).astype(dt)
            self.pse_shape = (off,)
        elif pse in ("slopes_N", "slopes_BN", "slopes_sqrt_N"):
            shp = (B, N1) if pse == "slopes_BN" else (N1,)
            sl = (rng.random(shp) + 0.1).astype(np.float32)
            self.pse_flat = sl.reshape(-1)
            self.pse_meta = [((b * N1) if pse == "slopes_BN" else 0, 1, 0) for b in range(B)]
            for b, (s1, s2) in enumerate(self.lens):
                slb = sl[b] if pse == "slopes_BN" else sl
                dist = np.abs((np.arange(s2)[None, :] + kv_start) - (np.arange(s1)[:, None] + q_start))
                dist = dist.astype(np.float64)
                if pse == "slopes_sqrt_N":
                    dist = np.sqrt(dist)
                self.pse[b] = -slb.astype(np.float64)[:, None, None] * dist[None]
        elif pse == "alibi_c":  # BNHS, non-TND rule (ALIBI_MODE 0)
            S1, S2 = self.lens[0]
            H = 1024
            comp = rnd((B, N1, H, S2), -2, 2)
            self.pse_flat = comp.astype(dt).reshape(-1)
            self.pse_meta = [(b * N1 * H * S2, H * S2, S2) for b in range(B)]
            self.alibi = (0, S1, S2)
            i = np.arange(S1)[:, None]
            j = np.arange(S2)[None, :]
            top = S1 - H
            m = np.where(i >= top, i - top, i % H)
            c = np.where(i >= top, j, j + (S2 - H) + (i % H) - i)
            m = np.clip(m, 0, H - 1)
            c = np.clip(c, 0, S2 - 1)
            for b in range(B):
                self.pse[b] = comp[b][:, m, c]
        elif pse == "alibi_c_tnd":  # 1NHS, TND rule (ALIBI_MODE 1): m - c = (i - j) - (W - 1024)
            H, W = 1024, S2m
            comp = rnd((1, N1, H, W), -2, 2)
            self.pse_flat = comp.astype(dt).reshape(-1)
            self.pse_meta = [(0, H * W, W)] * B
            self.alibi = (1, S1m, W)
            for b, (s1, s2) in enumerate(self.lens):
                t = np.arange(s1)[:, None] - np.arange(s2)[None, :]
                m = np.clip(np.where(t >= 0, H - 1, H - 1 + t), 0, H - 1)
                c = np.clip(np.where(t >= 0, W - 1 - t, W - 1), 0, W - 1)
                self.pse[b] = comp[0][:, m, c]

        self.tile_skip = tile_skip
        self.spec_kw = dict(dtype=dtype, d=D, dv=Dv, group=self.G, band=band is not None,
                            full_mask=full_mask is not None,
                            pse={None: "none", "BNSS": "ext", "1NSS": "ext", "BN1S": "ext", "TND_BNSS": "ext",
                                 "slopes_N": "slopes", "slopes_BN": "slopes", "slopes_sqrt_N": "slopes_sqrt",
                                 "alibi_c": "alibi_c", "alibi_c_tnd": "alibi_c"}[pse],
                            pse_add_first=pse_add_first, dropout=keep < 1.0)

    # -- layouts --------------------------------------------------------------------------------
    def _pack(self, xs, kv: bool):
        """Per-batch [N, S, W] float64 -> flat array of the layout + (offsets, head stride, row stride)."""
        N, W = xs[0].shape[0], xs[0].shape[2]
        L = self.layout
        if L == "BNSD":
            flat = np.stack(xs).reshape(-1)
            S = xs[0].shape[1]
            return flat, [b * N * S * W for b in range(self.B)], S * W, W
        if L == "BSH":
            S = xs[0].shape[1]
            flat = np.stack([x.transpose(1, 0, 2).reshape(S, N * W) for x in xs]).reshape(-1)
            return flat, [b * S * N * W for b in range(self.B)], W, N * W
        # TND
        rows = np.cumsum([0] + [x.shape[1] for x in xs])
        flat = np.concatenate([x.transpose(1, 0, 2).reshape(-1) for x in xs]) if rows[-1] else np.zeros(0)
        return flat, [int(r) * N * W for r in rows[:-1]], W, N * W

    def _unpack(self, flat, kv: bool, N, W):
        L = self.layout
        out, off = [], 0
        for s1, s2 in self.lens:
            S = s2 if kv else s1
            if L == "BNSD":
                out.append(flat[off:off + N * S * W].reshape(N, S, W))
            else:
                out.append(None)
            off += N * S * W
        if L == "BNSD":
            return out
        if L == "BSH":
            return [flat[b * N * S * W:(b + 1) * N * S * W].reshape(S, N, W).transpose(1, 0, 2)
                    for b, S in enumerate([(s2 if kv else s1) for s1, s2 in self.lens])]
        out, r = [], 0
        for s1, s2 in self.lens:
            S = s2 if kv else s1
            out.append(flat[r * N * W:(r + S) * N * W].reshape(S, N, W).transpose(1, 0, 2))
            r += S
        return out

    def _aligned(self, x, dtype):
        a = aligned_empty((max(1, x.size),), dtype)
        a[:x.size] = x.astype(dtype) if x.size else 0
        return a if x.size else a

    def rows(self):
        return sum(self.N1 * s1 for s1, _ in self.lens)

    def row0(self, b):
        return self.N1 * sum(s1 for s1, _ in self.lens[:b])

    def meta(self):
        dt = NP_DT[self.dtype]
        qf, qo, qsn, qss = self._pack(self.q, False)
        kf, ko, ksn, kss = self._pack(self.k, True)
        vf, vo, vsn, vss = self._pack(self.v, True)
        yf, yo, ysn, yss = self._pack(self.dy, False)
        bm = np.zeros((self.B, 16), np.int64)
        drop0 = 0
        for b, (s1, s2) in enumerate(self.lens):
            pre, nxt, prefix = self.bandv[b]
            mask_off = 0
            if self.full_mask == "BNSS":
                mask_off = b * self.N1 * s1 * s2
            bm[b] = [s1, s2, qo[b], ko[b], vo[b], yo[b], self.row0(b), drop0, pre, nxt, prefix, mask_off,
                     *self.pse_meta[b], 0]
            drop0 += self.N1 * s1 * s2
        ip = np.zeros(32, np.int64)
        ip[:10] = [self.B, self.N2, qsn, qss, ksn, kss, vsn, vss, ysn, yss]
        if self.full_mask == "SS":
            ip[10], ip[11] = 0, self.S2m
        elif self.full_mask == "BNSS":
            S1, S2 = self.lens[0]
            ip[10], ip[11] = S1 * S2, S2
        ip[14] = self.tile_skip
        ip[15], ip[16] = self.q_start, self.kv_start
        ip[17], ip[18], ip[19] = self.alibi
        ip[20] = 1 if self.invalid_rows else 0
        ip[21] = self.rows()
        ip[22], ip[23] = self.S1m, self.S2m
        fp = np.array([self.scale, self.keep, 1.0 / self.keep, 0], np.float32)
        A = self._aligned
        ins = {"q": A(qf, dt), "k": A(kf, dt), "v": A(vf, dt), "dy": A(yf, dt),
               "bmeta": A(bm.reshape(-1), np.int64), "iparams": A(ip, np.int64), "fparams": A(fp, np.float32)}
        if self.pse_flat is not None:
            ins["pse"] = A(self.pse_flat, self.pse_flat.dtype)
        if self.full_mask is not None:
            ins["atten_mask"] = A(self.mask_flat, np.uint8)
        if self.drop is not None:
            ins["drop_mask"] = A(self.drop_flat, np.uint8)
        return ins

    # -- float64 reference ----------------------------------------------------------------------
    def scores(self, b, n):
        s1, s2 = self.lens[b]
        pre, nxt, prefix = self.bandv[b]
        s = self.q[b][n] @ self.k[b][n // self.G].T
        p = self.pse[b][n]
        s = self.scale * (s + p) if self.pse_add_first else self.scale * s + p
        i = np.arange(s1)[:, None]
        j = np.arange(s2)[None, :]
        vis = ((j - i <= nxt) & (i - j <= pre)) | (j < prefix)
        masked = (~vis) | self.mask[b][n]
        return np.where(masked, -FLT_MAX, s)

    def dropf(self, b, n):
        if self.drop is None:
            return 1.0
        return self.drop[b][n] / self.keep

    def ref_fwd(self):
        O, M, L = [], [], []
        for b, (s1, s2) in enumerate(self.lens):
            Ob = np.zeros((self.N1, s1, self.Dv))
            Mb = np.full((self.N1, s1), -FLT_MAX)
            Lb = np.zeros((self.N1, s1))
            for n in range(self.N1):
                if s2 == 0 or s1 == 0:
                    continue
                s = self.scores(b, n)
                m = s.max(1)
                e = np.exp(s - m[:, None])
                l_ = e.sum(1)
                P = e / l_[:, None]
                Ob[n] = (P * self.dropf(b, n)) @ self.v[b][n // self.G]
                Mb[n], Lb[n] = m, l_
            if self.invalid_rows:
                inv = Mb == -FLT_MAX
                Ob[inv] = 0
                Lb[inv] = FLT_MAX
            O.append(Ob)
            M.append(Mb)
            L.append(Lb)
        return O, M, L

    def ref_bwd(self, O, M, L):
        """O (rounded attention_in), M, L (fp32 stats) per batch -> dq, dk, dv, dpse(dense per batch)."""
        dq, dk, dv, dp = [], [], [], []
        for b, (s1, s2) in enumerate(self.lens):
            dqb = np.zeros((self.N1, s1, self.D))
            dkb = np.zeros((self.N2, s2, self.D))
            dvb = np.zeros((self.N2, s2, self.Dv))
            dpb = np.zeros((self.N1, s1, s2))
            for n in range(self.N1):
                if s1 == 0 or s2 == 0:
                    continue
                n2 = n // self.G
                s = self.scores(b, n)
                m, l_ = M[b][n].astype(np.float64), L[b][n].astype(np.float64)
                inv = (M[b][n] == np.float32(-FLT_MAX)) & (L[b][n] == np.float32(FLT_MAX))
                with np.errstate(over="ignore", invalid="ignore"):
                    P = np.exp(s - m[:, None]) / l_[:, None]
                P[inv] = 0
                df = self.dropf(b, n)
                dP = self.dy[b][n] @ self.v[b][n2].T
                Di = (self.dy[b][n] * O[b][n]).sum(1)
                dS = P * (dP * df - Di[:, None])
                dvb[n2] += (P * df).T @ self.dy[b][n]
                dkb[n2] += self.scale * dS.T @ self.q[b][n]
                dqb[n] = self.scale * dS @ self.k[b][n2]
                dpb[n] = dS * self.scale if self.pse_add_first else dS
            dq.append(dqb)
            dk.append(dkb)
            dv.append(dvb)
            dp.append(dpb)
        return dq, dk, dv, dp

    def reduce_dpse(self, dp):
        """Dense per-batch dpse -> the flat dpse of the pse form."""
        if self.pse_kind == "BNSS":
            return np.stack(dp).reshape(-1)
        if self.pse_kind == "1NSS":
            return np.sum(np.stack(dp), axis=0).reshape(-1)
        if self.pse_kind == "BN1S":
            return np.stack([x.sum(1) for x in dp]).reshape(-1)
        if self.pse_kind == "TND_BNSS":
            return np.concatenate([x.reshape(-1) for x in dp])
        raise ValueError(self.pse_kind)


# ------------------------------------------------------------------------------------------------
# running the kernels


def spec_of(P: Problem, direction: str, dpse=False, dpse_sum_b=False) -> KernelSpec:
    return KernelSpec(direction=direction, dpse=dpse, dpse_sum_b=dpse_sum_b, **P.spec_kw)


def nan_out(n, dtype):
    a = aligned_empty((max(1, n),), dtype)
    a[...] = np.nan
    return a


def build(spec, hw=None):
    if hw is None:
        return jit.kernel(LLVM, spec)
    return jit.kernel(LLVM, spec, LLVM.default_knobs(spec, hw), hw=hw)


def run_fwd(P: Problem, ins=None, target=None):
    ins = ins or P.meta()
    spec = spec_of(P, "fwd")
    kern = build(spec, target)
    dt = NP_DT[P.dtype]
    o = nan_out(sum(P.N1 * s1 * P.Dv for s1, _ in P.lens), dt)
    sm = nan_out(P.rows() * 8, np.float32)
    ss = nan_out(P.rows() * 8, np.float32)
    args = [ins[n] for n in kern.param_names[:-3]] + [o, sm, ss]
    kern(*args)
    return o, sm, ss


def stats_per_batch(P: Problem, flat8):
    out = []
    for b, (s1, _) in enumerate(P.lens):
        r0 = P.row0(b)
        out.append(flat8[r0 * 8:(r0 + P.N1 * s1) * 8].reshape(P.N1, s1, 8))
    return out


def run_bwd(P: Problem, O, M, L, dpse=False, dpse_sum_b=False, ins=None, target=None):
    """O/M/L per batch (float64 O rounded to dtype by the packer; fp32 stats)."""
    ins = dict(ins or P.meta())
    dt = NP_DT[P.dtype]
    of, _, _, _ = P._pack(O, False)
    ins["o"] = P._aligned(of, dt)
    sm = np.concatenate([np.repeat(m.reshape(-1, 1), 8, 1).reshape(-1) for m in M]).astype(np.float32)
    ss = np.concatenate([np.repeat(x.reshape(-1, 1), 8, 1).reshape(-1) for x in L]).astype(np.float32)
    ins["smax"] = P._aligned(sm, np.float32)
    ins["ssum"] = P._aligned(ss, np.float32)
    spec = spec_of(P, "bwd", dpse, dpse_sum_b)
    kern = build(spec, target)
    nq = sum(P.N1 * s1 * P.D for s1, _ in P.lens)
    nk = sum(P.N2 * s2 * P.D for _, s2 in P.lens)
    nv = sum(P.N2 * s2 * P.Dv for _, s2 in P.lens)
    ins["dq"], ins["dk"], ins["dv"] = nan_out(nq, dt), nan_out(nk, dt), nan_out(nv, dt)
    if dpse:
        ins["dpse_acc"] = aligned_empty((P.pse_flat.size,), np.float32)
        ins["dpse_acc"][...] = 0
    ins["ws"] = nan_out(workspace_floats(spec, P.rows()), np.float32)
    kern(*[ins[n] for n in kern.param_names])
    res = {"dq": ins["dq"][:nq], "dk": ins["dk"][:nk], "dv": ins["dv"][:nv]}
    if dpse:
        res["dpse"] = ins["dpse_acc"]
    return res


def rel(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    assert np.all(np.isfinite(a)), "non-finite values in kernel output (unwritten element?)"
    nb = np.linalg.norm(b)
    return np.linalg.norm(a - b) / (nb if nb > 0 else 1.0)


def cat(xs):
    return np.concatenate([x.reshape(-1) for x in xs]) if xs else np.zeros(0)


def check_fwd(P: Problem, tol=None, target=None):
    tol = tol or TOL[P.dtype]
    O, M, L = P.ref_fwd()
    o, sm, ss = run_fwd(P, target=target)
    ob = P._unpack(o[:sum(P.N1 * s1 * P.Dv for s1, _ in P.lens)].astype(np.float64), False, P.N1, P.Dv)
    assert rel(cat(ob), cat(O)) <= tol, f"o rel err {rel(cat(ob), cat(O)):.3g}"
    smb, ssb = stats_per_batch(P, sm), stats_per_batch(P, ss)
    for x in smb + ssb:
        assert np.all(x == x[..., :1]), "the 8 stats lanes differ"
    assert rel(cat([x[..., 0] for x in smb]), cat(M)) <= tol, "softmax_max"
    assert rel(cat([x[..., 0] for x in ssb]), cat(L)) <= max(tol, 1e-5), "softmax_sum"
    return O, M, L, (o, sm, ss)


def check_bwd(P: Problem, dpse=False, dpse_sum_b=False, tol=None, stats=None, target=None):
    tol = tol or TOL[P.dtype]
    if stats is None:
        O, M, L = P.ref_fwd()
    else:
        O, M, L = stats
    dt = NP_DT[P.dtype]
    O = [x.astype(dt).astype(np.float64) for x in O]
    M = [x.astype(np.float32) for x in M]
    L = [x.astype(np.float32) for x in L]
    dq, dk, dv, dp = P.ref_bwd(O, M, L)
    res = run_bwd(P, O, M, L, dpse=dpse, dpse_sum_b=dpse_sum_b, target=target)
    got = {"dq": P._unpack(res["dq"].astype(np.float64), False, P.N1, P.D),
           "dk": P._unpack(res["dk"].astype(np.float64), True, P.N2, P.D),
           "dv": P._unpack(res["dv"].astype(np.float64), True, P.N2, P.Dv)}
    for name, ref in (("dq", dq), ("dk", dk), ("dv", dv)):
        e = rel(cat(got[name]), cat(ref))
        assert e <= tol, f"{name} rel err {e:.3g} > {tol}"
    if dpse:
        e = rel(res["dpse"], P.reduce_dpse(dp))
        assert e <= tol, f"dpse rel err {e:.3g} > {tol}"
    return res


# ------------------------------------------------------------------------------------------------
# cases

CAUSAL = (I32MAX, 0, 0)


@pytest.mark.parametrize("layout", ["BNSD", "BSH"])
def test_plain_fp32(layout):
    P = Problem(1, layout=layout, N1=2, seqs=((2, 40, 72),), D=32)
    check_fwd(P)
    check_bwd(P)


def test_causal_band_prefix():
    P = Problem(2, N1=2, seqs=((1, 100, 100),), D=32, band=CAUSAL)
    check_fwd(P)
    check_bwd(P)
    # band with a window and a prefix (per batch tokens), Sq != Skv
    P = Problem(3, N1=1, seqs=((2, 70, 90),), D=32, band=lambda b, s1, s2: (20 + 5 * b, 3, 17 + 9 * b))
    check_fwd(P)
    check_bwd(P)


def test_full_mask_ss_bnss():
    P = Problem(4, N1=2, seqs=((2, 33, 50),), D=16, full_mask="SS")
    check_fwd(P)
    check_bwd(P)
    P = Problem(5, N1=2, seqs=((2, 33, 50),), D=16, full_mask="BNSS", band=CAUSAL)
    check_fwd(P)
    check_bwd(P)


@pytest.mark.parametrize("form", ["BNSS", "1NSS", "BN1S"])
@pytest.mark.parametrize("add_first", [True, False])
def test_pse_ext_dpse(form, add_first):
    P = Problem(6, N1=2, seqs=((2, 37, 45),), D=16, pse=form, pse_add_first=add_first)
    check_fwd(P)
    check_bwd(P, dpse=True, dpse_sum_b=(form == "1NSS"))


@pytest.mark.parametrize("form", ["slopes_BN", "slopes_sqrt_N"])
def test_slopes(form):
    P = Problem(7, N1=2, seqs=((2, 30, 41),), D=16, pse=form, pse_add_first=False, q_start=3, kv_start=1,
                band=CAUSAL)
    check_fwd(P)
    check_bwd(P)


def test_alibi_compressed():
    # Sq >= 1024 exercises both branches of the non-TND expansion rule
    P = Problem(8, N1=1, seqs=((1, 1040, 1040),), D=16, pse="alibi_c", pse_add_first=False, band=CAUSAL)
    check_fwd(P)
    check_bwd(P)


def test_alibi_compressed_tnd():
    seqs = [(30, 50), (64, 64), (5, 9)]
    P = Problem(20, layout="TND", N1=1, seqs=seqs, D=16, pse="alibi_c_tnd", pse_add_first=False,
                band=lambda b, s1, s2: (I32MAX, s2 - s1, 0))
    check_fwd(P)
    check_bwd(P)


def test_dropout_gqa_dv():
    P = Problem(9, N1=4, N2=2, seqs=((2, 50, 66),), D=32, Dv=16, keep=0.8, band=CAUSAL)
    check_fwd(P)
    check_bwd(P)


@pytest.mark.parametrize("D,Dv,S1,S2", [(1, 1, 1, 37), (3, 3, 37, 37), (24, 7, 37, 19)])
def test_odd_sizes(D, Dv, S1, S2):
    P = Problem(10 + D, N1=2, seqs=((1, S1, S2),), D=D, Dv=Dv)
    check_fwd(P)
    check_bwd(P)


def test_d256():
    P = Problem(13, N1=1, seqs=((1, 40, 70),), D=256, band=CAUSAL)
    check_fwd(P)
    check_bwd(P)


def test_tnd_varlen_zero_lengths():
    seqs = [(17, 29), (0, 5), (40, 40), (6, 0), (1, 1)]
    P = Problem(14, layout="TND", N1=2, seqs=seqs, D=16, band=lambda b, s1, s2: (I32MAX, s2 - s1, 0),
                full_mask="SS", pse="TND_BNSS", keep=0.9)
    check_fwd(P)
    check_bwd(P, dpse=True)


def test_invalid_rows():
    # band that fully masks the first rows (next < 0): invalid-line forward, then exact zeros in bwd
    P = Problem(15, N1=2, seqs=((1, 40, 40),), D=16, band=(I32MAX, -5, 0), invalid_rows=True)
    O, M, L, (o, sm, ss) = check_fwd(P)
    smb, ssb = stats_per_batch(P, sm), stats_per_batch(P, ss)
    assert np.all(smb[0][:, :5] == np.float32(-FLT_MAX)) and np.all(ssb[0][:, :5] == np.float32(FLT_MAX))
    ob = P._unpack(o.astype(np.float64), False, P.N1, P.Dv)
    assert np.all(ob[0][:, :5] == 0)
    res = check_bwd(P)
    dq = P._unpack(res["dq"].astype(np.float64), False, P.N1, P.D)
    assert np.all(dq[0][:, :5] == 0), "invalid rows must contribute exactly zero"
    dk = P._unpack(res["dk"].astype(np.float64), True, P.N2, P.D)
    assert np.all(dk[0][:, 35:] == 0), "columns only seen by invalid rows must get exactly zero"


def test_tile_skip_equal():
    outs = []
    for skip in (0, 1):
        P = Problem(16, N1=2, seqs=((1, 150, 150),), D=16, band=(20, 0, 5), tile_skip=skip)
        O, M, L = P.ref_fwd()
        f = run_fwd(P)
        r = run_bwd(P, [x.astype(np.float32).astype(np.float64) for x in O],
                    [x.astype(np.float32) for x in M], [x.astype(np.float32) for x in L])
        outs.append((f, r))
    (f0, r0), (f1, r1) = outs
    for a, b in zip(f0, f1):
        assert np.array_equal(a, b)
    for k in r0:
        assert np.array_equal(r0[k], r1[k]), k


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision(dtype):
    P = Problem(17, dtype=dtype, N1=4, N2=2, seqs=((1, 70, 90),), D=32, band=CAUSAL, pse="BNSS", keep=0.9)
    check_fwd(P)
    check_bwd(P, dpse=True)


@pytest.mark.parametrize("mcpu", ["haswell", "x86-64"])
def test_narrower_vector_fallbacks(mcpu):
    """The AVX2 (8 fp32 lanes: vec=8 knobs) and generic x86-64 (vec=4) targets on the same math; both run on
    any x86-64 machine, whatever width this one has."""
    target = {"kind": "llvm", "mcpu": mcpu, "num-cores": 2}
    P = Problem(19, dtype="float16", N1=2, seqs=((2, 45, 37),), D=24, Dv=8, band=CAUSAL)
    check_fwd(P, target=target)
    check_bwd(P, target=target)


def test_determinism_runs():
    P = Problem(18, N1=4, N2=2, seqs=((2, 130, 130),), D=32, band=CAUSAL, pse="1NSS")
    O, M, L = P.ref_fwd()
    O = [x.astype(np.float32).astype(np.float64) for x in O]
    M = [x.astype(np.float32) for x in M]
    L = [x.astype(np.float32) for x in L]
    r1 = run_bwd(P, O, M, L, dpse=True, dpse_sum_b=True)
    r2 = run_bwd(P, O, M, L, dpse=True, dpse_sum_b=True)
    for k in r1:
        assert r1[k].tobytes() == r2[k].tobytes(), k


_THREAD_SCRIPT = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    sys.path.insert(0, {testdir!r})
    import test_kernel_abi as t
    P = t.Problem(18, N1=4, N2=2, seqs=((2, 130, 130),), D=32, band=t.CAUSAL, pse="1NSS")
    O, M, L = P.ref_fwd()
    O = [x.astype(np.float32).astype(np.float64) for x in O]
    M = [x.astype(np.float32) for x in M]
    L = [x.astype(np.float32) for x in L]
    r = t.run_bwd(P, O, M, L, dpse=True, dpse_sum_b=True)
    f = t.run_fwd(P)
    h = hashlib.sha256()
    for k in sorted(r):
        h.update(r[k].tobytes())
    for x in f:
        h.update(x.tobytes())
    print("HASH", h.hexdigest())
    # the parent process compiled these kernels: here they come from the disk cache, loaded through
    # tvm_ffi + libtvm_runtime only (the TVM compiler is never imported)
    from fag_tvm.jit import STATS
    assert STATS["compiled"] == 0 and STATS["disk_hits"] == 2, STATS
    assert "tvm" not in sys.modules, "a cache hit must not import the TVM compiler"
""")


def test_determinism_threads():
    testdir = os.path.dirname(os.path.abspath(__file__))
    P = Problem(18, N1=4, N2=2, seqs=((2, 130, 130),), D=32, band=CAUSAL, pse="1NSS")
    build(spec_of(P, "fwd"))  # compiled (and cached on disk) here, loaded there
    build(spec_of(P, "bwd", dpse=True, dpse_sum_b=True))
    hashes = []
    for nt in ("1", "2"):
        env = dict(os.environ, TVM_NUM_THREADS=nt)
        out = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT.format(testdir=testdir)], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        hashes.append([ln for ln in out.stdout.splitlines() if ln.startswith("HASH")][0])
    assert hashes[0] == hashes[1]
