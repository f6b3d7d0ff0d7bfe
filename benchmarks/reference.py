"""Reference structures the fused layer is measured against. Same parameters and numerics, slower structure.

- ``ExpertLoopLinear``: the per-expert Python loop of the reference LoRAMoE code (each expert a LoRA,
  ``result += G_n * (B_n(A_n(dropout_n(x))) * scaling)``), with dense dropout masks.
- ``GatherTopKLinear``: top-k routing computed sparsely, expert by expert on the tokens routed to it (gather,
  two small GEMMs, scatter-add): the FLOP-saving form, kept to measure whether the saving is real.
- ``PreviousFusedLinear``: the earlier fused forward (dense per-expert masks on an (N, M, D) copy of x, dense
  routing), kept so that what the current layer's structure saves is measured side by side.

Both subclass ``LoRAMoELinear`` and only replace ``forward``; ``convert`` swaps the class of every adapted layer
of a model in place, so a model built once with ``loramoe.inject`` can be measured in all three forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loramoe.layer import LoRAMoELinear, _top_k_weights


class ExpertLoopLinear(LoRAMoELinear):
    """``y = base(x) + sum_n G_n(x) * (B_n A_n drop_n(x) * alpha / R)``, one expert at a time."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        x = x.to(self.loramoe_A.dtype)
        probs = self.router_probs(x)  # (..., N) float32
        self._call_router_hooks(probs, result)
        weights = probs.to(x.dtype)
        p = self.dropout if self.training else 0.0
        shared = F.dropout(x, p) if p > 0 and self.dropout_mode == "shared" else None
        for n in range(self.num_experts):
            x_n = shared if shared is not None else F.dropout(x, p) if p > 0 else x
            expert = F.linear(F.linear(x_n, self.loramoe_A[n]), self.loramoe_B[n]) * self.scaling  # (..., O)
            result = result + (weights[..., n : n + 1] * expert).to(result.dtype)
        return result


class GatherTopKLinear(LoRAMoELinear):
    """Top-k routing, each expert computed only on its tokens (weights renormalised over the chosen k)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        x = x.to(self.loramoe_A.dtype)
        probs = self.router_probs(x)  # (..., N) float32
        self._call_router_hooks(probs, result)
        n, _, d = self.loramoe_A.shape
        x_MD = x.reshape(-1, d)
        top_w_Mk, top_i_Mk = probs.reshape(-1, n).to(x.dtype).topk(self.top_k, dim=-1)  # (M, k)
        top_w_Mk = top_w_Mk / top_w_Mk.sum(dim=-1, keepdim=True)
        p = self.dropout if self.training else 0.0
        out_MO = x_MD.new_zeros(x_MD.shape[0], self.out_features)
        for expert in range(n):  # each expert sees only the tokens routed to it
            token_idx, slot = (top_i_Mk == expert).nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            x_sel = (
                F.dropout(x_MD.index_select(0, token_idx), p) if p > 0 else x_MD.index_select(0, token_idx)
            )
            h = F.linear(x_sel, self.loramoe_A[expert]) * (
                top_w_Mk[token_idx, slot] * self.scaling
            ).unsqueeze(-1)
            out_MO = out_MO.index_add(0, token_idx, F.linear(h, self.loramoe_B[expert]))
        return result + out_MO.view(result.shape).to(result.dtype)


class PreviousFusedLinear(LoRAMoELinear):
    """The earlier fused forward: dense per-expert masks on an (N, M, D) copy of x, a separate router GEMM, B
    permuted to (O, N*R) for ``F.linear``."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        x = x.to(self.loramoe_A.dtype)
        probs = self.router_probs(x)  # (..., N) float32
        self._call_router_hooks(probs, result)
        n, r, d = self.loramoe_A.shape
        x_MD = x.reshape(-1, d)
        p = self.dropout if self.training else 0.0
        if p > 0 and self.dropout_mode == "per_expert":
            x_NMD = F.dropout(x_MD.unsqueeze(0).expand(n, -1, -1), p)
            h_MNR = torch.bmm(x_NMD, self.loramoe_A.transpose(1, 2)).transpose(0, 1)  # (M, N, R)
        else:
            h_MNR = F.linear(F.dropout(x_MD, p) if p > 0 else x_MD, self.loramoe_A.reshape(n * r, d)).view(
                -1, n, r
            )
        scale_MN = probs.to(x.dtype).reshape(-1, n) * self.scaling
        h_MK = (h_MNR * scale_MN.unsqueeze(-1)).reshape(-1, n * r)  # (M, N*R)
        B_OK = self.loramoe_B.permute(1, 0, 2).reshape(self.out_features, n * r)  # (O, N*R)
        return result + F.linear(h_MK, B_OK).view(result.shape).to(result.dtype)


def convert(model: nn.Module, cls: type[LoRAMoELinear]) -> nn.Module:
    """Give every ``LoRAMoELinear`` of ``model`` the forward of ``cls`` (parameters untouched), in place."""
    for module in model.modules():
        if isinstance(module, LoRAMoELinear):
            module.__class__ = cls
    return model


class DenseTopKLinear(LoRAMoELinear):
    """Top-k computed densely: every expert runs, the weights of the experts not chosen are zeroed. The library's
    sync-free form (used off the CPU and under torch.compile), forced here so the CPU can measure it."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        n, r, d = self.loramoe_A.shape
        x_MD = x.to(self.loramoe_A.dtype).reshape(-1, d)
        p = self.dropout if self.training else 0.0
        down, B_HO = self._stacked()
        h_MH, logits_MN = self._down_and_route(x_MD, down, p)
        probs = torch.softmax(logits_MN.float(), dim=-1)
        self._call_router_hooks(probs, result)
        weights_MN = _top_k_weights(probs, self.top_k).to(h_MH.dtype)
        scale_MN1 = (weights_MN * (self.scaling / (1.0 - p))).unsqueeze(-1)
        h_MH = (h_MH.view(-1, n, r) * scale_MN1).view(-1, n * r)
        return torch.addmm(result.reshape(-1, self.out_features), h_MH, B_HO).view(result.shape)
