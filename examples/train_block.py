"""Train a small causal transformer block for a few steps on the CPU twice — attention through
fag_tvm.torch.npu_fusion_attention (llvm kernels) and through torch's F.scaled_dot_product_attention —
from the same initial weights and data, and show that losses and gradients match.

    python examples/train_block.py [--steps 5] [--dtype fp32]
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import fag_tvm
import fag_tvm.torch as ft


class Block(torch.nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, attention: str = "fag"):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
        self.mask = torch.from_numpy(fag_tvm.masks.compressed_causal_mask())

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scale = (d // self.heads) ** -0.5
        if self.attention == "fag":  # BSH layout, left-up causal (sparse_mode 2)
            return ft.npu_fusion_attention(q.contiguous(), k.contiguous(), v.contiguous(), self.heads, "BSH",
                                           atten_mask=self.mask, sparse_mode=2, scale=scale)[0]
        split = lambda t: t.view(b, s, self.heads, -1).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True, scale=scale)
        return o.transpose(1, 2).reshape(b, s, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(self.attend(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    ours = Block(attention="fag")
    peer = copy.deepcopy(ours)
    peer.attention = "sdpa"
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_p = torch.optim.SGD(peer.parameters(), lr=0.05)
    worst_grad = 0.0
    for step in range(args.steps):
        x = torch.randn(args.batch, args.seq, 64)
        target = torch.randn(args.batch, args.seq, 64)
        losses = []
        for m, opt in ((ours, opt_o), (peer, opt_p)):
            opt.zero_grad()
            loss = F.mse_loss(m(x), target)
            loss.backward()
            losses.append(loss.item())
        for (n, a), b in zip(ours.named_parameters(), peer.parameters()):
            rel = ((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-30)).item()
            worst_grad = max(worst_grad, rel)
        opt_o.step()
        opt_p.step()
        print(f"step {step}: loss fag_tvm {losses[0]:.6f}  sdpa {losses[1]:.6f}  |diff| {abs(losses[0] - losses[1]):.2e}")
    print(f"largest relative gradient difference over all parameters and steps: {worst_grad:.2e}")
    ok = worst_grad < 1e-4
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
