"""Batched streaming step of torchaudio's Emformer encoder, exact for streams at any position.

torchaudio's ``_EmformerLayer.infer`` reads the number of valid left-context
frames from batch element 0 only, so streams whose left context is still filling
(their first 8 chunks) cannot be stacked. This module runs the same layer maths
from the same weights, with a per-stream key mask instead:

* each stream owns a *slot* in ``LeftContextPool``: per layer, a ring of the last
  32 utterance keys and values (the 30-frame left context, rounded up to whole
  4-frame segments), all layers in one tensor;
* a step gathers the slots of the batch (one copy per layer, with room for the
  chunk's own keys), masks the ring entries a stream has not filled yet (and the 2
  oldest once the ring is full), and writes back only the 4 new frames of each
  stream, all layers at once.

Attention is a weighted sum over keys, so their order in the ring does not
matter; results match ``Emformer.infer`` to float rounding (the tests check
1e-4) for any mix of stream positions.

A step may also carry several consecutive chunks of one stream (a stream that is
behind: the end of its input, or audio sent faster than real time). Each chunk is
a *group* of rows of its own; a later chunk sees, in the ring positions of the
earlier chunks of the same step, their fresh keys and values (put into its copy
of the ring before attention), so every chunk attends to exactly the keys, in
exactly the order, that it would have seen one step at a time.

Shapes (B streams, D model width, E encoder output width):
``features (B, 20, 80)`` -> ``encoder output (B, 4, E)``.
"""

from __future__ import annotations

import copy
import functools
import logging

import torch
import torch.nn.functional as F

from server.model.moe import MoEFeedForward

log = logging.getLogger(__name__)

SEGMENT = 4  # reduced (40 ms) frames per chunk
RIGHT_CONTEXT = 1  # reduced frames of look-ahead


class StreamingLayer(torch.nn.Module):
    """One Emformer layer's streaming step, with its own copy of the layer's weights.

    The query, key and value projections are fused into one ``Linear`` (one matrix
    product instead of two); everything else is torchaudio's ``_EmformerLayer``
    maths. The layers are plain ``Linear`` / ``LayerNorm`` modules so that a
    precision (``server.kernels.precision``) applies to them like to any model.
    """

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        att, ff = layer.attention, layer.pos_ff  # pos_ff: LayerNorm, Linear, act, Dropout, Linear, Dropout
        dim = att.emb_to_query.in_features
        self.qkv = torch.nn.utils.skip_init(torch.nn.Linear, dim, 3 * dim)  # no draw from torch's generator
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([att.emb_to_query.weight, att.emb_to_key_value.weight]))
            self.qkv.bias.copy_(torch.cat([att.emb_to_query.bias, att.emb_to_key_value.bias]))
        self.ln_in = copy.deepcopy(layer.layer_norm_input)
        self.out = copy.deepcopy(att.out_proj)
        # a Mixture-of-Experts feed-forward (server.model.moe) runs as it is, in eval mode
        self.moe = copy.deepcopy(ff).eval() if isinstance(ff, MoEFeedForward) else None
        if self.moe is None:
            self.ln_ff = copy.deepcopy(ff[0])
            self.ff1 = copy.deepcopy(ff[1])
            self.activation = copy.deepcopy(ff[2])
            self.ff2 = copy.deepcopy(ff[4])
        self.ln_out = copy.deepcopy(layer.layer_norm_output)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.moe is not None:
            return self.moe(x)
        return self.ff2(self.activation(self.ff1(self.ln_ff(x))))


class LeftContextPool:
    """Left-context keys and values of every stream, one slot per stream, all layers together.

    ``kv`` is ``(slots, layers, 2, ring + rows, D)``: ``kv[s, l, 0]`` the keys and
    ``kv[s, l, 1]`` the values of layer ``l``. The first ``ring`` positions hold the
    utterance keys of the stream's last ``ring // 4`` chunks, chunk ``n`` at positions
    ``(n % (ring // 4)) * 4 + [0, 4)``; the last ``rows`` positions are scratch room for
    the current chunk's own keys (right context and segment), so that one gather per
    layer yields its attention keys and values in place (``StreamingEncoder.forward``).
    """

    def __init__(self, num_layers: int, dim: int, left_context: int, dtype: torch.dtype,
                 device: torch.device, initial_slots: int = 8):
        self.num_layers, self.dim, self.left_context = num_layers, dim, left_context
        self.ring = -(-left_context // SEGMENT) * SEGMENT  # 30 -> 32
        self.rows = SEGMENT + RIGHT_CONTEXT
        self.chunks_in_ring = self.ring // SEGMENT
        self.dtype, self.device = dtype, device
        self.kv = torch.zeros(initial_slots, num_layers, 2, self.ring + self.rows, dim, dtype=dtype, device=device)
        self._free = list(range(initial_slots - 1, -1, -1))
        self._masks = self._mask_table()

    @property
    def capacity(self) -> int:
        return self.kv.size(0)

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.kv[slot].zero_()
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def _grow(self) -> None:
        old = self.capacity
        self.kv = torch.cat([self.kv, torch.zeros_like(self.kv)])
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def _mask_table(self) -> torch.Tensor:
        """``table[k]`` marks the valid ring entries of a stream that has run ``n`` chunks,
        ``k = n`` while the ring fills (n < chunks_in_ring), else ``chunks_in_ring + n % chunks_in_ring``."""
        rows = []
        for key in range(2 * self.chunks_in_ring):
            n = key if key < self.chunks_in_ring else key  # n chunks done (any n with this key)
            valid = torch.zeros(self.ring, dtype=torch.bool)
            first_frame = max(0, n * SEGMENT - self.left_context)
            for c in range(max(0, n - self.chunks_in_ring), n):
                for i in range(SEGMENT):
                    if c * SEGMENT + i >= first_frame:
                        valid[(c % self.chunks_in_ring) * SEGMENT + i] = True
            rows.append(valid)
        return torch.stack(rows).to(self.device)

    def mask_rows(self, chunks_done: torch.Tensor) -> torch.Tensor:
        """``(B,)`` chunks processed -> ``(B, ring)`` bool, True where the ring entry is context."""
        k = self.chunks_in_ring
        key = torch.where(chunks_done < k, chunks_done, k + chunks_done % k)
        return self._masks[key]


class StreamingEncoder(torch.nn.Module):
    """Batched, position-independent ``transcribe_streaming`` of a torchaudio Emformer RNN-T.

    Holds its own copy of the transcriber's weights (the loaded model is left
    untouched, so a reduced precision can be checked against it).
    """

    def __init__(self, transcriber: torch.nn.Module):
        super().__init__()
        emformer = transcriber.transformer
        self.input_linear = copy.deepcopy(transcriber.input_linear)
        self.stride = transcriber.time_reduction.stride
        self.output_linear = copy.deepcopy(transcriber.output_linear)
        self.output_norm = copy.deepcopy(transcriber.layer_norm)
        first = emformer.emformer_layers[0]
        self.dim = first.input_dim
        self.heads = first.attention.num_heads
        self.scaling = first.attention.scaling
        self.left_context = first.left_context_length
        if emformer.segment_length != SEGMENT or emformer.right_context_length != RIGHT_CONTEXT:
            raise ValueError("StreamingEncoder needs 4 reduced frames per segment and 1 of right context")
        self.layers = torch.nn.ModuleList(StreamingLayer(layer) for layer in emformer.emformer_layers)
        self.fused_layers: FusedLayers | None = None  # see fuse()
        # the active native back end's attention, fixed for this encoder's life (None: torch's)
        self.ring_attention = native_ring_attention()
        self.eval()

    def fuse(self) -> bool:
        """Run all layers of a step in one native call from now on (``FusedLayers``), where the
        layers' precision allows; call once the layers are final (after ``apply_precision``).
        Returns whether they are fused."""
        self.fused_layers = FusedLayers.wrap(self)
        return self.fused_layers is not None

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the activations and the left-context state (the layer norms' dtype)."""
        return self.output_norm.weight.dtype

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def new_pool(self, dtype: torch.dtype, device: torch.device) -> LeftContextPool:
        return LeftContextPool(self.num_layers, self.dim, self.left_context, dtype, device)

    def forward(self, features: torch.Tensor, pool: LeftContextPool, slots: torch.Tensor,
                 chunks_done: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk for each of B groups (a stream's chunk; a stream may have several).

        Args:
            features: ``(B, T >= 20, 80)``, the window's frames; frames past 20 are ignored.
            pool: the streams' left-context store; updated in place.
            slots: ``(B,)`` long, each group's stream's pool slot.
            chunks_done: ``(B,)`` long, chunks the stream has run before this group's chunk.
            previous: ``(B, P)`` long or None: for each group, the groups of this step that hold
                its stream's P preceding chunks, oldest first, padded with -1 (P < 8); None when
                every group is a different stream.
        Returns:
            ``(B, 4, E)`` encoder output for the chunk's 4 segment frames.
        """
        B = features.size(0)
        D, H = self.dim, self.heads
        frames = (SEGMENT + RIGHT_CONTEXT) * self.stride
        x = self.input_linear(features[:, :frames].to(self.dtype))
        x = x.reshape(B, SEGMENT + RIGHT_CONTEXT, -1)  # 4x time reduction by stacking
        # torchaudio orders rows [right context, utterance]; keep that layout throughout.
        x = torch.cat([x[:, SEGMENT:], x[:, :SEGMENT]], dim=1)
        rows = x.size(1)
        context_mask = pool.mask_rows(chunks_done)
        ring = pool.ring
        carried = None if previous is None else self._carried_keys(previous, chunks_done, rows, pool)
        segments = []  # each layer's (B, 2, 4, D) segment keys and values, for the ring
        in_place = self.ring_attention if x.dtype == torch.float32 and x.is_cpu and (D // H) % 8 == 0 else None
        carried_rows = None  # in_place's form of `carried`: (B, ring) row of this step's keys, or -1
        mask = None  # the gathered path's attention mask: the context, then the chunk's own rows
        if in_place is None:
            mask = torch.cat([context_mask, context_mask.new_ones(B, rows)], dim=1)[:, None, None, :]
        elif carried is not None:
            to_group, to_pos, from_row = carried
            carried_rows = torch.full((B, ring), -1, dtype=torch.long, device=slots.device)
            carried_rows[to_group, to_pos] = from_row
        if in_place is not None and self.fused_layers is not None:
            x, segments = self.fused_layers(x, pool.kv, slots, context_mask, carried_rows)
            self._write_segments(pool, slots, chunks_done, segments)
            return self.output_norm(self.output_linear(x[:, RIGHT_CONTEXT:]))
        for index, layer in enumerate(self.layers):
            q, k, v = layer.qkv(layer.ln_in(x)).split(D, dim=-1)
            if in_place is not None:  # the ring read where it lies: no gather (server/kernels/native)
                attn = in_place(q, k, v, pool.kv[:, index], slots, context_mask, carried_rows, H, self.scaling)
                segment = torch.stack([k[:, RIGHT_CONTEXT:], v[:, RIGHT_CONTEXT:]], dim=1)
            else:
                attn, segment = self._gathered_attention(q, k, v, pool.kv[:, index], slots, mask, carried)
            segments.append(segment)
            x = layer.out(attn) + x
            x = layer.ln_out(layer.feed_forward(x) + x)
        self._write_segments(pool, slots, chunks_done, torch.stack(segments, dim=1))
        return self.output_norm(self.output_linear(x[:, RIGHT_CONTEXT:]))

    @staticmethod
    def _write_segments(pool: LeftContextPool, slots: torch.Tensor, chunks_done: torch.Tensor,
                        segments: torch.Tensor) -> None:
        """The chunk's segment keys and values of every layer, ``(B, L, 2, 4, D)``, into the ring at
        the chunk's place."""
        write_pos = ((chunks_done % pool.chunks_in_ring) * SEGMENT)[:, None] + torch.arange(
            SEGMENT, device=slots.device)
        pool.kv[slots[:, None], :, :, write_pos] = segments.permute(0, 3, 1, 2, 4)

    def _gathered_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: torch.Tensor,
                            slots: torch.Tensor, mask: torch.Tensor, carried) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention of one layer by gathering the groups' rings (``layer_kv`` is
        ``pool.kv[:, layer]``) with room for their own keys: ``(B, rows, D)`` output, and the
        ``(B, 2, 4, D)`` segment keys and values for the ring."""
        B, rows, D = q.shape
        H, ring = self.heads, layer_kv.size(2) - rows
        # The layer's keys and values of the B groups, context and scratch rows, in one gather
        # (layer by layer: at 32 streams all layers at once were 97 MB, out of every cache).
        kv = layer_kv.index_select(0, slots)  # (B, 2, ring + rows, D)
        keys, values = kv[:, 0], kv[:, 1]
        keys[:, ring:] = k
        values[:, ring:] = v
        if carried is not None:  # earlier chunks of the same stream in this step
            to_group, to_pos, from_row = carried
            keys.index_put_((to_group, to_pos), k.reshape(-1, D).index_select(0, from_row).to(kv.dtype))
            values.index_put_((to_group, to_pos), v.reshape(-1, D).index_select(0, from_row).to(kv.dtype))
        attn = F.scaled_dot_product_attention(
            q.reshape(B, rows, H, -1).transpose(1, 2),
            keys.reshape(B, -1, H, D // H).transpose(1, 2),
            values.reshape(B, -1, H, D // H).transpose(1, 2),
            attn_mask=mask, scale=self.scaling)
        return attn.transpose(1, 2).reshape(B, rows, D), kv[:, :, ring + RIGHT_CONTEXT:]

    @staticmethod
    def _carried_keys(previous: torch.Tensor, chunks_done: torch.Tensor, rows: int,
                      pool: LeftContextPool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Where each group's copy of the ring takes keys of its stream's earlier chunks in this
        step: (group, ring position) <- row of the flattened ``(B * rows, D)`` keys."""
        group, depth = torch.nonzero(previous >= 0, as_tuple=True)
        if group.numel() == 0:
            return None
        source = previous[group, depth]
        chunk = chunks_done[source]  # that chunk's index in its stream
        if bool((chunks_done[group] - chunk >= pool.chunks_in_ring).any()):
            raise ValueError(f"a step may carry at most {pool.chunks_in_ring} chunks of one stream")
        frame = torch.arange(SEGMENT, device=previous.device)
        to_group = group[:, None].expand(-1, SEGMENT).reshape(-1)
        to_pos = ((chunk % pool.chunks_in_ring) * SEGMENT)[:, None].add(frame).reshape(-1)
        from_row = (source * rows + RIGHT_CONTEXT)[:, None].add(frame).reshape(-1)
        return to_group, to_pos, from_row


class FusedLayers:
    """``StreamingEncoder``'s layer loop with the in-place ring attention as one native call
    (``server.kernels.native.emformer_layers``): the same operators in the same order, so the same
    results, without about 60 dispatched operators and the Python frames per layer (int8
    random-base at 1 to 7 streams: the step's fixed cost is mostly those). For layers whose
    linears the kernels cover (every one a ``BlockedLinear``, or every one a native
    ``RowwiseInt8Linear``), float32 layer norms and a ReLU / GELU / SiLU feed-forward."""

    ACTIVATIONS = {torch.nn.ReLU: 0, torch.nn.GELU: 1, torch.nn.SiLU: 2}

    def __init__(self, op, kind: int, linears: list[torch.Tensor], out_features: list[int],
                 norms: list[torch.Tensor], eps: list[float], activation: int, heads: int, scale: float):
        self._op, self._kind, self._linears, self._out_features = op, kind, linears, out_features
        self._norms, self._eps, self._activation = norms, eps, activation
        self._heads, self._scale = heads, scale

    @classmethod
    def wrap(cls, encoder: "StreamingEncoder") -> "FusedLayers | None":
        from server.kernels import native
        from server.kernels.linear import native_layer_norm_args, native_linear_args

        op = native.emformer_layers()
        if op is None or encoder.ring_attention is None or (encoder.dim // encoder.heads) % 8:
            return None
        layers = list(encoder.layers)
        if any(layer.moe is not None for layer in layers):
            return None  # the native loop has no Mixture-of-Experts feed-forward
        modules = [m for layer in layers for m in (layer.qkv, layer.out, layer.ff1, layer.ff2)]
        linears = native_linear_args(modules)
        norms = native_layer_norm_args([n for layer in layers for n in (layer.ln_in, layer.ln_ff, layer.ln_out)])
        activations = {cls.ACTIVATIONS.get(type(layer.activation)) for layer in layers}
        gelu_exact = all(getattr(layer.activation, "approximate", "none") == "none" for layer in layers)
        if linears is None or norms is None or len(activations) != 1 or None in activations or not gelu_exact:
            return None
        return cls(op, linears[0], linears[1], [m.out_features for m in modules], norms[0], norms[1],
                   activations.pop(), encoder.heads, encoder.scaling)

    def __call__(self, x: torch.Tensor, ring_kv: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor,
                 carried: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, rows, D)`` -> ``(B, rows, D)`` after every layer, and the segment keys and values
        ``(B, L, 2, 4, D)`` for the ring (``ring_kv`` is ``LeftContextPool.kv``, read only)."""
        return self._op(x, self._linears, self._kind, self._out_features, self._norms, self._eps,
                        self._activation, ring_kv, slots, valid, carried, self._heads, self._scale)


def native_ring_attention():
    """The active native back end's ``ring_attention`` (the attention of ``StreamingEncoder.forward``
    reading each stream's ring in place, instead of a gather per layer and
    ``scaled_dot_product_attention``; measured 5x faster at 16 streams), or ``None`` on the torch
    path or where it differs from that path by more than float rounding on a probe here. fp32 on
    CPU only."""
    from server.kernels import native

    return _probed_ring_attention(native.active())


@functools.cache
def _probed_ring_attention(backend: str):
    from server.kernels import native

    op = native.ring_attention()
    if op is None:
        return None
    generator = torch.Generator().manual_seed(0)
    slots_total, ring, rows, dim, heads = 6, 32, SEGMENT + RIGHT_CONTEXT, 128, 4
    kv = torch.randn(slots_total, 2, ring + rows, dim, generator=generator)
    q, k, v = torch.randn(3, 4, rows, dim, generator=generator)
    slots = torch.tensor([4, 0, 5, 2])
    valid = torch.rand(4, ring, generator=generator) > 0.4
    valid[1] = False  # a stream's first chunk: no context yet
    keys, values = kv.index_select(0, slots).unbind(1)
    keys, values = torch.cat([keys[:, :ring], k], 1), torch.cat([values[:, :ring], v], 1)
    mask = torch.cat([valid, valid.new_ones(4, rows)], 1)[:, None, None, :]
    split = lambda t: t.reshape(4, -1, heads, dim // heads).transpose(1, 2)  # noqa: E731
    want = F.scaled_dot_product_attention(split(q), split(keys), split(values), attn_mask=mask, scale=0.25)
    want = want.transpose(1, 2).reshape(4, rows, dim)
    got = op(q, k, v, kv, slots, valid, None, heads, 0.25)
    error = float((got - want).norm() / want.norm())
    if not error < 1e-5:
        log.warning("native ring attention (%s) differs from scaled_dot_product_attention here (%.1e); not used",
                    backend, error)
        return None
    return op
