"""Transformer parts of the SRDTrans bottleneck: temporal attention, then Swin spatial attention.

Tensors enter and leave as ``(B, C, T, Y, X)``. The temporal transformer treats every pixel as
a sequence of ``T`` tokens; the Swin transformer treats every coarse frame as an image of
``Y x X`` tokens attended inside 7x7 windows, shifted by 3 on every second layer.

Frames are padded to a multiple of the window, and the padding is masked out as a key (not
merely zero-filled: zero tokens would still take attention weight), so padded pixels never
influence real ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Mlp",
    "SpatialTransformer",
    "SwinLayer",
    "TemporalTransformer",
    "attend",
    "relative_position_index",
    "window_mask",
]

#: Most (batch x window) entries per attention call: CUDA's fused attention kernels put the
#: batch on a launch-grid axis limited to 65535, and a full-resolution frame has ~1e6 pixel
#: sequences (pytorch/pytorch#142228).
MAX_BATCH = 65535
#: Most attention logits per call, bounding the memory of the unfused (CPU, masked) path.
MAX_LOGITS = 2**27


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention over ``(A, W, H, L, D)`` tensors, in bounded calls.

    Parameters
    ----------
    q, k, v
        Queries, keys and values; ``A`` is a batch, ``W`` a group (the window index) that
        ``mask`` depends on, ``H`` heads, ``L`` tokens, ``D`` the head width.
    bias
        Additive bias shared by all groups, ``(H, L, L)``, or ``None``.
    mask
        Additive per-group bias ``(W, L, L)`` (``-inf`` where attention is forbidden), or
        ``None``.
    dropout
        Attention dropout probability (pass 0 at evaluation).

    Returns
    -------
    torch.Tensor
        ``(A, W, H, L, D)``.
    """
    a, w, h, length, width = q.shape
    budget = max(1, min(MAX_BATCH, MAX_LOGITS // (h * length * k.shape[-2])))
    if bias is None and mask is None:
        # Plain 4D attention lets PyTorch pick a fused kernel on GPUs.
        flat = [t.reshape(a * w, h, length, -1) for t in (q, k, v)]
        parts = [
            F.scaled_dot_product_attention(*(t[i : i + budget] for t in flat), dropout_p=dropout)
            for i in range(0, a * w, budget)
        ]
        return _cat(parts, 0).reshape(a, w, h, length, width)
    w_step = min(w, budget)
    a_step = max(1, budget // w_step)
    rows = []
    for a0 in range(0, a, a_step):
        columns = []
        for w0 in range(0, w, w_step):
            part = (slice(a0, a0 + a_step), slice(w0, w0 + w_step))
            if mask is None:
                combined = bias
            else:
                combined = mask[w0 : w0 + w_step, None]
                combined = combined if bias is None else combined + bias
            columns.append(_masked(q[part], k[part], v[part], combined.to(q.dtype), dropout))
        rows.append(_cat(columns, 1))
    return _cat(rows, 0)


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat`` that does not copy a single part (the usual case)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout: float
) -> torch.Tensor:
    """Attention with an additive bias: fused on GPUs, written out on the CPU.

    On the CPU, PyTorch's fused attention with a float mask checks every row for being fully
    masked (an ``all`` and a ``where`` over the logits) and is no faster than the plain formula,
    which measured about a quarter cheaper (forward and backward, 100 windows of 49 tokens).
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    logits = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)) + bias
    weights = logits.softmax(dim=-1)
    if dropout:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, v)


class Mlp(nn.Sequential):
    """Linear, GELU, linear."""

    def __init__(self, dim: int, ratio: float) -> None:
        hidden = round(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class _TemporalLayer(nn.Module):
    """Pre-norm transformer layer with global self-attention over a short sequence."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn_dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        tokens = self.norm1(x)
        drop = self.attn_dropout if self.training else 0.0
        if length == 1 and not drop:
            # One token attends only to itself with weight exactly 1 (a softmax over one
            # logit), so attention returns its value: skip the queries, keys and the attention
            # call. This is the bottleneck of every 16-frame patch.
            out = F.linear(tokens, self.qkv.weight[2 * dim :])
        else:
            qkv = self.qkv(tokens).reshape(n, 1, length, 3, self.heads, dim // self.heads)
            q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)
            out = attend(q, k, v, dropout=drop)  # (n, 1, heads, length, head_dim)
            out = out.squeeze(1).transpose(1, 2).reshape(n, length, dim)
        x = x + self.proj(out)
        return x + self.mlp(self.norm2(x))


class TemporalTransformer(nn.Module):
    """Self-attention along time for every pixel, with a learned absolute position embedding.

    Parameters
    ----------
    dim
        Token width (the bottleneck channels).
    length
        Number of coarse time steps (``patch_t / 2**levels``); fixed, because the position
        embedding is learned for exactly this length.
    depth, heads, mlp_ratio, attn_dropout
        Layers, attention heads, MLP width ratio and attention dropout.
    """

    def __init__(
        self,
        dim: int,
        length: int,
        *,
        depth: int,
        heads: int,
        mlp_ratio: float,
        attn_dropout: float,
    ) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.zeros(1, length, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.layers = nn.ModuleList(
            _TemporalLayer(dim, heads, mlp_ratio, attn_dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend along T of a ``(B, C, T, Y, X)`` tensor."""
        b, c, t, y, xx = x.shape
        seq = x.permute(0, 3, 4, 2, 1).reshape(b * y * xx, t, c) + self.position
        for layer in self.layers:
            seq = layer(seq)
        seq = self.norm(seq)
        return seq.reshape(b, y, xx, t, c).permute(0, 4, 3, 1, 2)


def relative_position_index(window: int) -> torch.Tensor:
    """Index into the ``(2w-1)**2`` bias table for every (query, key) pair of a window.

    The index of a pair is ``(dy + w - 1) * (2w - 1) + (dx + w - 1)`` with
    ``dy = y_query - y_key`` and ``dx = x_query - x_key``.
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def window_mask(height: int, width: int, *, window: int, shift: int) -> torch.Tensor:
    """Which keys each query may see, per window of the padded and shifted frame.

    Parameters
    ----------
    height, width
        The real (unpadded) frame size.
    window, shift
        Window side and cyclic shift.

    Returns
    -------
    torch.Tensor
        Boolean ``(n_windows, L, L)`` with ``L = window**2``, windows in row-major order:
        ``True`` where the key is a real pixel of the same (unwrapped) region as the query,
        and always on the diagonal so that no row is empty (a padding query then attends
        only to itself; padding outputs are cropped away).
    """
    padded_h = -(-height // window) * window
    padded_w = -(-width // window) * window

    def axis(size: int, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
        position = torch.arange(padded)  # position in the rolled frame
        original = (position + shift) % padded
        wrapped = position >= padded - shift  # came around from the start of the frame
        return wrapped, original < size

    wrap_y, real_y = axis(height, padded_h)
    wrap_x, real_x = axis(width, padded_w)
    region = (2 * wrap_y[:, None] + wrap_x[None, :]).to(torch.int64)
    real = real_y[:, None] & real_x[None, :]
    region_w = _partition(region[..., None], window).squeeze(-1)  # (nW, L)
    real_w = _partition(real[..., None], window).squeeze(-1)
    allowed = (region_w[:, :, None] == region_w[:, None, :]) & real_w[:, None, :]
    return allowed | torch.eye(window * window, dtype=torch.bool)


def _partition(frames: torch.Tensor, window: int) -> torch.Tensor:
    """``(..., H, W, C)`` with H, W multiples of ``window`` -> ``(..., nW, window**2, C)``."""
    *lead, h, w, c = frames.shape
    tiles = frames.reshape(*lead, h // window, window, w // window, window, c)
    tiles = tiles.transpose(-4, -3)
    return tiles.reshape(*lead, (h // window) * (w // window), window * window, c)


def _merge(tiles: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_partition`."""
    *lead, _, _, c = tiles.shape
    frames = tiles.reshape(*lead, h // window, w // window, window, window, c)
    return frames.transpose(-4, -3).reshape(*lead, h, w, c)


class SwinLayer(nn.Module):
    """One pre-norm (shifted-)window attention layer with relative position bias.

    Parameters
    ----------
    dim, heads, window, shift, mlp_ratio, attn_dropout
        Token width, heads, window side, cyclic shift (0 for plain windows), MLP ratio and
        attention dropout.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        attn_dropout: float,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.window = window
        self.shift = shift
        self.attn_dropout = attn_dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        # Derived from the window, so not stored in model files.
        self.register_buffer("bias_index", relative_position_index(window), persistent=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self._masks: dict[tuple[int, int, str, bool], torch.Tensor] = {}

    def _mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """Additive ``(nW, L, L)`` mask: 0 where allowed, ``-inf`` elsewhere."""
        # Tensors made under inference_mode cannot join autograd later, so they are cached apart.
        key = (height, width, str(device), torch.is_inference_mode_enabled())
        mask = self._masks.get(key)
        if mask is None:
            allowed = window_mask(height, width, window=self.window, shift=self.shift)
            mask = torch.zeros(allowed.shape, device=device).masked_fill_(
                ~allowed.to(device), float("-inf")
            )
            self._masks = {key: mask}  # frames of one size repeat; keep only the latest
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend inside windows of ``(N, Y, X, C)`` frames."""
        n, height, width, dim = x.shape
        w = self.window
        tokens = self.norm1(x)
        pad_h, pad_w = (-height) % w, (-width) % w
        tokens = F.pad(tokens, (0, 0, 0, pad_w, 0, pad_h))
        if self.shift:
            tokens = torch.roll(tokens, shifts=(-self.shift, -self.shift), dims=(1, 2))
        hp, wp = height + pad_h, width + pad_w
        tiles = _partition(tokens, w)  # (n, nW, L, C)
        n_windows, length = tiles.shape[1:3]
        qkv = self.qkv(tiles).reshape(n, n_windows, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # (n, nW, heads, L, D)
        drop = self.attn_dropout if self.training else 0.0
        relative = self.bias_table[self.bias_index].permute(2, 0, 1)  # (heads, L, L)
        mask = self._mask(height, width, x.device)
        out = attend(q, k, v, bias=relative, mask=mask, dropout=drop)
        out = self.proj(out.transpose(2, 3).reshape(n, n_windows, length, dim))
        out = _merge(out, w, hp, wp)
        if self.shift:
            out = torch.roll(out, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + out[:, :height, :width]
        return x + self.mlp(self.norm2(x))


class SpatialTransformer(nn.Module):
    """Swin layers over every coarse frame; every second layer uses shifted windows.

    Parameters
    ----------
    dim, depth, heads, window, shift, mlp_ratio, attn_dropout
        Token width, layers, heads, window side, shift of the odd layers, MLP ratio and
        attention dropout.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        heads: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        attn_dropout: float,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            SwinLayer(
                dim,
                heads=heads,
                window=window,
                shift=shift if index % 2 else 0,
                mlp_ratio=mlp_ratio,
                attn_dropout=attn_dropout,
            )
            for index in range(depth)
        )
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend within windows of every frame of a ``(B, C, T, Y, X)`` tensor."""
        b, c, t, y, xx = x.shape
        frames = x.permute(0, 2, 3, 4, 1).reshape(b * t, y, xx, c)
        for layer in self.layers:
            frames = layer(frames)
        return frames.reshape(b, t, y, xx, c).permute(0, 4, 1, 2, 3)
