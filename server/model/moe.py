"""Mixture-of-Experts feed-forward for the Emformer layers, in training and in serving.

``MoEFeedForward`` replaces an ``_EmformerLayer.pos_ff`` (LayerNorm, Linear, activation,
Dropout, Linear, Dropout): the same pre-norm, then a router ``Linear(D, E)`` picks each
frame's ``top_k`` experts (the highest router logits; equal logits go to the lower expert
index), their gates are the softmax of those ``top_k`` logits, and the output is the gated
sum of the chosen experts' ``Linear(D, F) -> activation -> Dropout -> Linear(F, D)``. Every
frame goes to its experts: no capacity limit, no dropped tokens, in training as in serving.

Training adds a load-balancing loss (Switch Transformer / Mixtral form):
``E * sum_e f_e * P_e``, with ``f_e`` the share of the frames' ``top_k`` assignments that
went to expert ``e`` and ``P_e`` the mean router probability of ``e``; 1.0 when perfectly
balanced. Each forward leaves it in ``aux_loss``; ``balance_loss(model)`` averages the layers'.

Serving (``server.model.encoder.StreamingLayer``) runs the same module in eval mode on a batched
step's rows: the rows are grouped by expert, each expert runs once on its group, and every
operation is per row, so with the precision's row-invariant matrix products
(``server.kernels.precision``) a frame's output never depends on the other frames of the step.
``last_counts`` keeps the rows each expert received in the last forward (the experts a step read).
A model config names it with ``moe_experts``, ``moe_top_k`` and ``moe_ffn_dim``
(``server.model.loading.ModelConfig``; ``moe_experts`` 0 is the dense feed-forward).
"""

from __future__ import annotations

import torch

MOE_FIELDS = ("moe_experts", "moe_top_k", "moe_ffn_dim")  # ModelConfig's fields for this module


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, E)`` router logits -> ``(N, top_k)`` expert indices and gates, per row only.

    A stable descending sort breaks ties by the lower expert index, so equal logits route the
    same way whatever else is in the batch.
    """
    values, experts = torch.sort(logits, dim=-1, descending=True, stable=True)
    gates = torch.softmax(values[:, :top_k], dim=-1)
    return experts[:, :top_k], gates


class MoEFeedForward(torch.nn.Module):
    def __init__(self, dim: int, ffn_dim: int, experts: int, top_k: int, activation: torch.nn.Module,
                 dropout: float):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k {top_k} must be between 1 and the number of experts {experts}")
        self.top_k = top_k
        self.norm = torch.nn.LayerNorm(dim)
        self.router = torch.nn.Linear(dim, experts)
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(dim, ffn_dim), activation, torch.nn.Dropout(dropout),
                                torch.nn.Linear(ffn_dim, dim))
            for _ in range(experts))
        self.dropout = torch.nn.Dropout(dropout)
        self.aux_loss: torch.Tensor | None = None
        self.last_counts: torch.Tensor | None = None  # frames per expert in the last forward

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` -> ``(..., D)``. The frames are grouped by expert (one gather into expert
        order), each expert runs once on its contiguous group, and each frame's ``top_k`` results
        are summed in gate order; every operation is per row, so with row-invariant matrix
        products (``server.kernels.precision``) a frame's output never depends on the others."""
        shape = x.shape
        h = self.norm(x).reshape(-1, shape[-1])
        logits = self.router(h)
        experts, gates = route(logits, self.top_k)
        flat = experts.reshape(-1)  # (N * top_k,) assignment j of row n at n * top_k + j
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        grouped = h.index_select(0, order // self.top_k)
        outputs, start = [], 0
        for expert, count in zip(self.experts, counts.tolist()):
            if count:
                outputs.append(expert(grouped[start:start + count]))
            start += count
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y = torch.cat(outputs).index_select(0, inverse).reshape(-1, self.top_k, shape[-1])
        out = y[:, 0] * gates[:, :1]
        for j in range(1, self.top_k):
            out = out + y[:, j] * gates[:, j:j + 1]
        self.last_counts = counts.detach()
        if self.training:
            share = counts.to(h.dtype) / flat.numel()
            probability = torch.softmax(logits, dim=-1).mean(0)
            self.aux_loss = self.num_experts * (share * probability).sum()
        return self.dropout(out.reshape(shape))


def moeify(rnnt: torch.nn.Module, experts: int, top_k: int, ffn_dim: int) -> torch.nn.Module:
    """Replace every Emformer layer's ``pos_ff`` of ``rnnt`` (in place) by a ``MoEFeedForward``
    with the dense one's activation and dropout; returns ``rnnt``."""
    for layer in rnnt.transcriber.transformer.emformer_layers:
        dense = layer.pos_ff
        dim = dense[0].normalized_shape[0]
        layer.pos_ff = MoEFeedForward(dim, ffn_dim, experts, top_k, type(dense[2])(), dense[3].p)
    return rnnt


def moe_layers(model: torch.nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def balance_loss(model: torch.nn.Module) -> torch.Tensor | None:
    """Mean over the MoE layers of their last forward's load-balancing loss (None: dense)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).mean() if losses else None
