"""Tests of the SRDTrans network: shapes, size, errors, and windowed attention vs a naive one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from srdvol.errors import ConfigError, ModelMismatchError
from srdvol.model import attention, layers
from srdvol.model.attention import SwinLayer, TemporalTransformer, attend
from srdvol.model.config import NetworkConfig
from srdvol.model.network import build_network, count_parameters

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("patch_t", "shape"),
    [(16, (16, 23, 30)), (16, (16, 7, 7)), (16, (16, 1, 3)), (32, (32, 10, 8))],
)
def test_output_shape_equals_input_shape(patch_t: int, shape: tuple[int, int, int]) -> None:
    network = build_network(NetworkConfig.tiny(patch_t=patch_t))
    x = torch.randn(2, 1, *shape, requires_grad=True)
    y = network(x)
    assert y.shape == x.shape
    assert y.dtype == torch.float32
    y.square().mean().backward()
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(x.grad).all()


def test_default_network_has_about_1_8_million_parameters() -> None:
    config = NetworkConfig()
    assert config.channels == (8, 16, 32, 64)
    assert (config.embed_dim, config.heads, config.window, config.shift) == (128, 8, 7, 3)
    count = count_parameters(build_network(config))
    assert abs(count - 1.8e6) < 0.1 * 1.8e6


def test_wrong_frame_count_is_a_clear_error() -> None:
    network = build_network(NetworkConfig.tiny(patch_t=16))
    with pytest.raises(ModelMismatchError, match="patch 16"):
        network(torch.zeros(1, 1, 32, 8, 8))
    with pytest.raises(ModelMismatchError, match="patch"):
        network(torch.zeros(1, 16, 8, 8))


def test_config_validation_names_the_option() -> None:
    with pytest.raises(ValidationError, match=r"\[\[patch\]\]: patch_t 24"):
        NetworkConfig(patch_t=24)
    with pytest.raises(ValidationError, match="heads"):
        NetworkConfig(heads=3)
    with pytest.raises(ValidationError, match="shift"):
        NetworkConfig(window=4, shift=4)
    with pytest.raises(ValidationError):
        NetworkConfig(unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match=r"^patch: patch_t 40 is not a multiple of 16") as info:
        NetworkConfig.from_options(patch_t=40)
    assert info.value.command_line_message().startswith("--patch: patch_t 40")
    assert NetworkConfig.from_options(patch_t=48).patch_t == 48
    assert NetworkConfig.model_fields["window"].description  # docstrings become descriptions


def test_training_after_inference_mode_still_backpropagates() -> None:
    network = build_network(NetworkConfig.tiny())
    x = torch.randn(1, 1, 16, 9, 9)
    with torch.inference_mode():
        expected = network(x)
    y = network(x)
    y.square().mean().backward()
    torch.testing.assert_close(y.detach(), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_autocast_forward_matches_fp32(seed: int) -> None:
    # bf16 keeps 8 significant bits (one rounding: 2^-9 = 0.2 % relative). Allowed: 2^-6 (1.6 %)
    # of the output's range, i.e. a few roundings through the network; measured 0.44-0.57 %.
    torch.manual_seed(seed)
    network = build_network(NetworkConfig.tiny()).eval()
    x = torch.randn(2, 1, 16, 9, 12)
    with torch.inference_mode():
        expected = network(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = network(x)
    assert y.shape == (2, 1, 16, 9, 12)
    assert y.dtype == torch.bfloat16  # autocast really ran the network in bf16
    scale = float(expected.abs().max())
    assert scale > 0
    error = float((y.float() - expected).abs().max())
    assert error <= 2**-6 * scale, (error, scale)
    assert error > 0  # and it is not a silent fp32 pass


def _naive_window_attention(layer: SwinLayer, x: torch.Tensor) -> torch.Tensor:
    """Reference: each pixel attends to the real pixels of its own cell of the partition.

    In image coordinates the (shifted) Swin partition cuts each axis at ``shift + k * window``
    (plain windows: at ``k * window``). Written without padding, rolling or masks.
    """
    n, height, width, dim = x.shape
    w, s, heads = layer.window, layer.shift, layer.heads
    tokens = layer.norm1(x)
    q, k, v = layer.qkv(tokens).reshape(n, height, width, 3, heads, dim // heads).unbind(3)
    out = torch.zeros(n, height, width, heads, dim // heads)

    def cell(i: int) -> int:
        return (i - s) // w if s else i // w

    for yq in range(height):
        for xq in range(width):
            keys = [
                (yk, xk)
                for yk in range(height)
                for xk in range(width)
                if cell(yk) == cell(yq) and cell(xk) == cell(xq)
            ]
            kk = torch.stack([k[:, yk, xk] for yk, xk in keys], dim=1)  # (n, m, heads, D)
            vv = torch.stack([v[:, yk, xk] for yk, xk in keys], dim=1)
            index = torch.tensor(
                [(yq - yk + w - 1) * (2 * w - 1) + (xq - xk + w - 1) for yk, xk in keys]
            )
            bias = layer.bias_table[index].T  # (heads, m)
            logits = torch.einsum("nhd,nmhd->nhm", q[:, yq, xq], kk) / math.sqrt(dim // heads)
            weights = torch.softmax(logits + bias, dim=-1)
            out[:, yq, xq] = torch.einsum("nhm,nmhd->nhd", weights, vv)
    x = x + layer.proj(out.reshape(n, height, width, dim))
    return x + layer.mlp(layer.norm2(x))


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("size", [(9, 12), (7, 14), (4, 5)])
def test_swin_layer_matches_naive_windowed_attention(shift: int, size: tuple[int, int]) -> None:
    layer = SwinLayer(8, heads=2, window=7, shift=shift, mlp_ratio=2.0, attn_dropout=0.0).eval()
    with torch.no_grad():
        layer.bias_table.normal_()  # make the position bias matter
    x = torch.randn(2, *size, 8)
    with torch.no_grad():
        expected = _naive_window_attention(layer, x)
        actual = layer(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_shifted_window_gradient_stays_inside_the_wrapped_corner() -> None:
    # With shift 3 the top-left 3x3 corner is its own region: rolling brings it next to the
    # far edge, and the mask must keep it from seeing those pixels.
    layer = SwinLayer(8, heads=2, window=7, shift=3, mlp_ratio=2.0, attn_dropout=0.0)
    x = torch.randn(1, 14, 14, 8, requires_grad=True)
    layer(x)[0, 0, 0].sum().backward()
    reached = x.grad[0].abs().sum(-1) > 0
    assert reached[:3, :3].all()
    assert not reached[3:].any()
    assert not reached[:, 3:].any()


def test_temporal_transformer_mixes_time_but_not_pixels() -> None:
    module = TemporalTransformer(8, 4, depth=1, heads=2, mlp_ratio=2.0, attn_dropout=0.0)
    x = torch.randn(1, 8, 4, 3, 3, requires_grad=True)
    # A weighted sum: a plain sum over channels of a LayerNorm output is constant.
    (module(x)[0, :, 0, 1, 1] * torch.randn(8)).sum().backward()
    reached = x.grad[0].abs().sum(0) > 0  # (t, y, x)
    assert reached[:, 1, 1].all()
    reached[:, 1, 1] = False
    assert not reached.any()
    with pytest.raises(RuntimeError):
        module(torch.randn(1, 8, 5, 3, 3))  # the position embedding fixes the length


def test_chunked_attention_equals_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = (torch.randn(5, 6, 2, 9, 4) for _ in range(3))
    bias = torch.randn(2, 9, 9)
    mask = torch.zeros(6, 9, 9)
    mask[:, 0, 1:] = float("-inf")
    masked = attend(q, k, v, bias=bias, mask=mask)
    plain = attend(q, k, v)
    reference = torch.softmax(q @ k.transpose(-1, -2) / 2 + bias + mask[:, None], dim=-1) @ v
    torch.testing.assert_close(masked, reference)
    monkeypatch.setattr(attention, "MAX_BATCH", 4)
    torch.testing.assert_close(attend(q, k, v, bias=bias, mask=mask), masked)
    torch.testing.assert_close(attend(q, k, v), plain)
    monkeypatch.setattr(attention, "MAX_LOGITS", 2 * 9 * 9 * 3)
    torch.testing.assert_close(attend(q, k, v, bias=bias, mask=mask), masked)
    no_bias = torch.softmax(q @ k.transpose(-1, -2) / 2 + mask[:, None], dim=-1) @ v
    torch.testing.assert_close(attend(q, k, v, mask=mask), no_bias)
    torch.testing.assert_close(masked[:, :, :, 0], v[:, :, :, 0])


# ---- the CPU fast paths compute the same function as the plain layers they replace


def _plain_conv(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A conv module's function through torch's plain 3D ops (the code before the fast paths)."""
    if isinstance(module, torch.nn.ConvTranspose3d):
        return F.conv_transpose3d(
            x, module.weight, module.bias, module.stride, module.padding, module.output_padding
        )
    return F.conv3d(x, module.weight, module.bias, module.stride, module.padding)


def _plain_sequential(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    for layer in block:
        x = _plain_conv(layer, x) if isinstance(layer, torch.nn.Conv3d) else layer(x)
    return x


def _plain_temporal(module: TemporalTransformer, x: torch.Tensor) -> torch.Tensor:
    b, c, t, y, xx = x.shape
    seq = x.permute(0, 3, 4, 2, 1).reshape(b * y * xx, t, c) + module.position
    for layer in module.layers:
        n, length, dim = seq.shape
        qkv = layer.qkv(layer.norm1(seq)).reshape(n, length, 3, layer.heads, dim // layer.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, dim)
        seq = seq + layer.proj(out)
        seq = seq + layer.mlp(layer.norm2(seq))
    seq = module.norm(seq)
    return seq.reshape(b, y, xx, t, c).permute(0, 4, 3, 1, 2)


def _plain_swin(layer: SwinLayer, x: torch.Tensor) -> torch.Tensor:
    n, height, width, dim = x.shape
    w, heads = layer.window, layer.heads
    tokens = F.pad(layer.norm1(x), (0, 0, 0, (-width) % w, 0, (-height) % w))
    if layer.shift:
        tokens = torch.roll(tokens, shifts=(-layer.shift, -layer.shift), dims=(1, 2))
    hp, wp = tokens.shape[1:3]
    tiles = (
        tokens.reshape(n, hp // w, w, wp // w, w, dim).transpose(2, 3).reshape(n, -1, w * w, dim)
    )
    qkv = layer.qkv(tiles).reshape(n, tiles.shape[1], w * w, 3, heads, dim // heads)
    q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)
    allowed = attention.window_mask(height, width, window=w, shift=layer.shift)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    bias = layer.bias_table[layer.bias_index].permute(2, 0, 1) + mask[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = layer.proj(out.transpose(2, 3).reshape(n, tiles.shape[1], w * w, dim))
    out = out.reshape(n, hp // w, wp // w, w, w, dim).transpose(2, 3).reshape(n, hp, wp, dim)
    if layer.shift:
        out = torch.roll(out, shifts=(layer.shift, layer.shift), dims=(1, 2))
    x = x + out[:, :height, :width]
    return x + layer.mlp(layer.norm2(x))


def _plain_forward(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The SRDTrans forward pass as written before the CPU fast paths: plain Conv3d and
    ConvTranspose3d, fused attention everywhere, no layout changes."""
    skips = []
    for level, down in zip(network.encoder.levels, network.encoder.downs, strict=True):
        x = _plain_sequential(level, x)
        skips.append(x)
        x = _plain_sequential(down, x)
    x = _plain_sequential(network.conv_in, x)
    x = _plain_temporal(network.temporal, x)
    b, c, t, y, xx = x.shape
    frames = x.permute(0, 2, 3, 4, 1).reshape(b * t, y, xx, c)
    for layer in network.spatial.layers:
        frames = _plain_swin(layer, frames)
    x = frames.reshape(b, t, y, xx, c).permute(0, 4, 1, 2, 3)
    x = _plain_sequential(network.conv_out, x)
    for up, level, skip in zip(
        network.decoder.ups, network.decoder.levels, reversed(skips), strict=True
    ):
        x = _plain_sequential(level, _plain_conv(up, x) + skip)
    return x


@pytest.mark.parametrize(
    ("patch_t", "size"), [(16, (32, 32)), (16, (23, 30)), (32, (20, 17)), (64, (9, 12))]
)
def test_forward_and_gradients_equal_the_plain_implementation(patch_t, size):
    # The default widths (not the tiny test network), so every fast path runs at real sizes:
    # one-frame convolutions and single-token attention at patch_t 16, 2 and 4 coarse frames
    # at 32 and 64.
    network = build_network(NetworkConfig(patch_t=patch_t)).train()
    with torch.no_grad():
        for layer in network.spatial.layers:
            layer.bias_table.normal_()  # make the position bias matter
    x = torch.randn(2, 1, patch_t, *size)
    fast = network(x)
    fast.square().mean().backward()
    fast_grads = {n: p.grad.clone() for n, p in network.named_parameters()}
    network.zero_grad()
    plain = _plain_forward(network, x)
    plain.square().mean().backward()
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    for name, param in network.named_parameters():
        scale = float(param.grad.abs().max()) + 1e-12
        torch.testing.assert_close(
            fast_grads[name] / scale, param.grad / scale, rtol=1e-3, atol=1e-4, msg=name
        )


@pytest.mark.parametrize("frames", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_time_convolutions_equal_torch_convolutions(frames, stride):
    conv = layers.TimeConv3d(5, 7, kernel_size=3, stride=(stride, 1, 1), padding=1)
    up = layers.TimeConvTranspose3d(
        5, 7, kernel_size=(4, 3, 3), stride=(stride, 1, 1), padding=(1, 1, 1)
    )
    for module in (conv, up):
        x = torch.randn(2, 5, frames, 6, 9, requires_grad=True)
        out = module(x)
        expected = _plain_conv(module, x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        gradients = torch.autograd.grad(out.sum(), (x, module.weight, module.bias))
        reference = torch.autograd.grad(expected.sum(), (x, module.weight, module.bias))
        for got, want in zip(gradients, reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [8, 9, 16, 23])
@pytest.mark.parametrize("frames", [3, 5, 8])
def test_one_sample_convolutions_run_as_two_halves_and_equal_torch(rows, frames, monkeypatch):
    conv = layers.TimeConv3d(3, 4, kernel_size=3, stride=(2, 1, 1), padding=1)
    same = layers.TimeConv3d(3, 4, kernel_size=3, padding=1)
    up = layers.TimeConvTranspose3d(3, 4, kernel_size=(4, 3, 3), stride=(2, 1, 1), padding=1)
    halves = []
    split = layers._in_two_halves
    monkeypatch.setattr(
        layers, "_in_two_halves", lambda x, h, run: halves.append(h) or split(x, h, run)
    )
    for module in (conv, same, up):
        x = torch.randn(1, 3, frames, rows, 10, requires_grad=True)
        out = module(x)
        expected = _plain_conv(module, x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        gradients = torch.autograd.grad(out.square().sum(), (x, module.weight, module.bias))
        reference = torch.autograd.grad(expected.square().sum(), (x, module.weight, module.bias))
        for got, want in zip(gradients, reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert halves == [1, 1, 1]  # every module took the two-halves path
    # A batch of two or a frame too small to cut is left to torch.
    same(torch.randn(2, 3, frames, rows, 10))
    same(torch.randn(1, 3, frames, 6, 10))
    assert halves == [1, 1, 1]


def test_model_files_keep_their_parameter_names_and_shapes():
    network = build_network(NetworkConfig())
    shapes = {name: tuple(t.shape) for name, t in network.state_dict().items()}
    # A few names a model file written before the fast paths holds.
    assert shapes["encoder.levels.0.0.weight"] == (4, 1, 3, 3, 3)
    assert shapes["decoder.ups.0.weight"] == (64, 64, 4, 3, 3)
    assert shapes["temporal.layers.0.qkv.weight"] == (384, 128)
    assert shapes["spatial.layers.1.bias_table"] == (169, 8)
    # Counted on the network before the fast paths.
    assert len(shapes) == 103
    assert count_parameters(network) == 1_802_769


def test_data_parallel_training_gets_no_gradient_layout_warning(tmp_path):
    # Warnings are errors here: channels-last strides on the one-channel input once gave the
    # first weight a gradient layout that DistributedDataParallel warns about on every run.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from srdvol.training.pairs import random_dihedral, spatial_loss, spatial_pairs

    dist.init_process_group(
        "gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0, world_size=1
    )
    try:
        model = DistributedDataParallel(build_network(NetworkConfig.tiny()))
        for _ in range(2):
            inputs, target_a, target_b = spatial_pairs(random_dihedral(torch.randn(2, 16, 16, 16)))
            spatial_loss(model(inputs[:, None])[:, 0], target_a, target_b).backward()
    finally:
        dist.destroy_process_group()
