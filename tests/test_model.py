"""Tests of MCFormer, the denoising network (docs/method.md §2; paper §3.3), on tiny configs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from blinddiff.model import (
    GatedFeedForward,
    MCFormer,
    MCFormerConfig,
    ModulatedLayerNorm,
    ModulatedTransformerBlock,
    TransposedAttention,
    count_parameters,
    describe_complexity,
)

TINY = dict(width=8, blocks=(1, 1, 1, 1), heads=(1, 1, 1, 1), refinement_blocks=1,
            estimator_depth=2, estimator_width=8, kernel_size=7)
# TINY with grouped 3×3 mixing: expansion 2.5 makes the GDFN hidden widths 20, 40, 80, 160, multiples of 4
GROUPED = dict(ffn_expansion=2.5, mixer_group_width=4)


def tiny(**overrides) -> MCFormer:
    torch.manual_seed(0)
    return MCFormer(MCFormerConfig(**{**TINY, **overrides}))


def inputs(b: int = 2, h: int = 32, w: int = 24, scale: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(b, 3, h, w, generator=g)
    lr = torch.rand(b, 3, math.ceil(h / scale), math.ceil(w / scale), generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    return x_t, t, lr


def assert_valid_kernels(kernel: torch.Tensor, b: int, k: int) -> None:
    assert kernel.shape == (b, k, k)
    assert torch.all(kernel >= 0)
    torch.testing.assert_close(kernel.sum(dim=(1, 2)), torch.ones(b), atol=1e-5, rtol=0)


# --- shapes ------------------------------------------------------------------


@pytest.mark.parametrize("b", [1, 2])
def test_output_shapes(b):
    model = tiny()
    x_t, t, lr = inputs(b)
    out, kernel = model(x_t, t, lr)
    assert out.shape == (b, 6, 32, 24)
    assert_valid_kernels(kernel, b, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(100, 76), (33, 17)])
@pytest.mark.parametrize("scale", [1, 2, 3, 4])
@pytest.mark.parametrize("rounding", [math.ceil, math.floor])
def test_any_size_and_scale(size, scale, rounding):
    model = tiny().eval()
    h, w = size
    x_t = torch.randn(1, 3, h, w)
    lr = torch.rand(1, 3, rounding(h / scale), rounding(w / scale))
    with torch.no_grad():
        out, kernel = model(x_t, torch.tensor([500]), lr)
    assert out.shape == (1, 6, h, w)
    assert torch.isfinite(out).all()
    assert_valid_kernels(kernel, 1, 7)


@pytest.mark.parametrize("stem", [dict(), dict(patch_size=4, blocks=(1, 1), heads=(1, 1), residual_over="lr")])
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (9, 2), (13, 22), (33, 17)])
def test_padding_to_the_size_multiple_is_cropped_away(size, stem):
    """A size off the network's multiple is padded at the bottom and right (reflected; replicated where the image
    is too small to reflect) and cropped back: the output is that of the image padded beforehand to a size that
    needs no padding, cropped, and so is the kernel."""
    model = tiny(**stem).eval()
    multiple, (h, w) = model.cfg.size_multiple, size
    g = torch.Generator().manual_seed(2)
    x_t, lr = torch.randn(2, 3, h, w, generator=g), torch.rand(2, 3, math.ceil(h / 4), math.ceil(w / 4), generator=g)
    t = torch.tensor([3, 999])
    pad_h, pad_w = -h % multiple, -w % multiple
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    x_big, lr_big = (F.pad(z, (0, pad_w, 0, pad_h), mode=mode) for z in (x_t, model.upsample_lr(lr, (h, w))))
    assert x_big.shape[-2] % multiple == 0 and x_big.shape[-1] % multiple == 0
    with torch.no_grad():
        out, kernel = model(x_t, t, lr)
        out_big, kernel_big = model(x_big, t, lr_big)  # an LR of the output's size is used as is
    assert out.shape == (2, 6, h, w)
    torch.testing.assert_close(out, out_big[..., :h, :w], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel, kernel_big, atol=1e-6, rtol=1e-5)


def test_scale_one_uses_lr_as_is():
    model = tiny()
    lr = torch.rand(1, 3, 20, 12)
    assert model.upsample_lr(lr, (20, 12)) is lr
    up = model.upsample_lr(lr, (80, 48))
    torch.testing.assert_close(up, F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False))


def test_learned_variance_off_gives_c_channels():
    model = tiny(learned_variance=False)
    x_t, t, lr = inputs()
    out, _ = model(x_t, t, lr)
    assert out.shape == (2, 3, 32, 24)


def test_output_residual_adds_x_t_to_eps_only():
    with_res, without = tiny(output_residual=True).eval(), tiny(output_residual=False).eval()
    without.load_state_dict(with_res.state_dict())
    x_t, t, lr = inputs()
    with torch.no_grad():
        a, _ = with_res(x_t, t, lr)
        b, _ = without(x_t, t, lr)
    torch.testing.assert_close(a[:, :3] - x_t, b[:, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[:, 3:], b[:, 3:])


def test_scalar_timestep_broadcasts():
    model = tiny().eval()
    x_t, _, lr = inputs()
    with torch.no_grad():
        a, _ = model(x_t, torch.tensor(250), lr)
        b, _ = model(x_t, torch.tensor([250.0, 250.0]), lr)
    torch.testing.assert_close(a, b)


# --- conditioning ------------------------------------------------------------


def test_the_timestep_conditions_the_image_branch_and_not_the_kernel_head():
    """k̂_t is estimated from concat(x_t, ↑y) alone (docs/method.md §2): the same for any t, and the same as
    `estimate_kernel`; the image branch is modulated by the time embedding, so its output moves with t."""
    model = tiny().eval()
    x_t, t, lr = inputs()
    with torch.no_grad():
        base, k_base = model(x_t, t, lr)
        other_t, k_t = model(x_t, (t + 300) % 1000, lr)
        k_direct = model.estimate_kernel(x_t, model.upsample_lr(lr, x_t.shape[-2:]))
        _, k_other_lr = model(x_t, t, lr.flip(-1))
    torch.testing.assert_close(k_t, k_base, atol=0, rtol=0)
    torch.testing.assert_close(k_direct, k_base, atol=0, rtol=0)
    assert (k_other_lr - k_base).abs().max() > 0  # the LR half of its input is read
    assert (base - other_t).abs().max() > 1e-4


def test_kernel_modulation_off():
    model = tiny(kernel_modulation=False).eval()
    assert model.kernel_embedding is None
    x_t, t, lr = inputs()
    with torch.no_grad():
        out, kernel = model(x_t, t, lr)
        # Without kernel modulation the image branch ignores the estimator entirely.
        for p in model.kernel_estimator.parameters():
            p.add_(torch.randn_like(p))
        out2, kernel2 = model(x_t, t, lr)
    assert out.shape == (2, 6, 32, 24)
    assert_valid_kernels(kernel, 2, 7)
    torch.testing.assert_close(out, out2)
    assert (kernel - kernel2).abs().max() > 0
    assert count_parameters(tiny()) - count_parameters(model) == count_parameters(tiny().kernel_embedding)


def test_the_image_branch_sees_the_estimator_only_through_the_kernel():
    """The kernel modulation embeds k̂ (docs/method.md §2), not the estimator's raw logits: logits shifted by a
    constant give the same softmax kernel and so the same output; logits that change k̂ change the output."""
    model = tiny().eval()
    x_t, t, lr = inputs()
    bias = model.kernel_estimator.project.bias
    with torch.no_grad():
        out, kernel = model(x_t, t, lr)
        bias.add_(3.0)
        shifted, shifted_kernel = model(x_t, t, lr)
        bias.add_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(4)))
        changed, changed_kernel = model(x_t, t, lr)
    torch.testing.assert_close(shifted_kernel, kernel, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(shifted, out, atol=1e-5, rtol=1e-5)
    assert (changed_kernel - kernel).abs().max() > 1e-3 and (changed - out).abs().max() > 1e-4


# --- kernel head -------------------------------------------------------------


def test_pca_head_gives_valid_kernels_and_uses_the_basis():
    model = tiny(kernel_head="pca", pca_code_length=5)
    assert model.kernel_pca_mean.shape == (49,) and model.kernel_pca_basis.shape == (5, 49)
    x_t, t, lr = inputs()
    out, kernel = model(x_t, t, lr)
    assert out.shape == (2, 6, 32, 24)
    assert_valid_kernels(kernel, 2, 7)
    out.square().mean().backward()
    assert model.kernel_estimator.project.weight.grad.abs().sum() > 0

    # A zero basis decodes every code to the (renormalised) mean kernel.
    target = torch.rand(7, 7)
    model.set_kernel_basis(target, torch.zeros(5, 7, 7))
    with torch.no_grad():
        kernel = model.estimate_kernel(x_t, F.interpolate(lr, size=(32, 24), mode="bicubic"))
    torch.testing.assert_close(kernel, (target / target.sum()).expand(2, 7, 7), atol=1e-6, rtol=1e-5)
    assert "kernel_pca_basis" in model.state_dict()

    # Negative taps are clamped to zero.
    negative = torch.full((49,), -1.0)
    negative[24] = 1.0
    model.set_kernel_basis(negative, torch.zeros(5, 49))
    with torch.no_grad():
        kernel = model.estimate_kernel(x_t, F.interpolate(lr, size=(32, 24), mode="bicubic"))
    assert_valid_kernels(kernel, 2, 7)
    assert kernel[:, 3, 3].min() > 0.999


def test_set_kernel_basis_errors():
    with pytest.raises(ValueError, match="kernel_head='pca'"):
        tiny().set_kernel_basis(torch.zeros(49), torch.zeros(10, 49))
    model = tiny(kernel_head="pca", pca_code_length=5)
    with pytest.raises(ValueError, match=r"\(5, 49\)"):
        model.set_kernel_basis(torch.zeros(49), torch.zeros(4, 49))
    with pytest.raises(ValueError, match="49 taps"):
        model.set_kernel_basis(torch.zeros(48), torch.zeros(5, 49))


# --- size --------------------------------------------------------------------


def test_paper_preset_parameter_count():
    model = MCFormer(MCFormerConfig())
    total = count_parameters(model)
    assert abs(total - 26_509_267) <= 0.01 * 26_509_267
    assert total == 26_509_267  # the authors' release, exactly
    groups = model.parameter_groups()
    assert sum(groups.values()) == total
    assert groups["latent"] == 8 * count_parameters(model.latent[0])
    assert groups["kernel_embedding"] == 441 * 48 + 48 + 48 * 48 + 48


def test_describe_complexity():
    cfg = MCFormerConfig(**TINY)
    info = describe_complexity(cfg, 64, scale=4)
    assert info["parameters"] == count_parameters(tiny()) == sum(info["parameters_per_part"].values())
    assert info["lr_size"] == 16
    # Everything but the pooled kernel head and the embeddings scales with the pixel count.
    ratio = describe_complexity(cfg, 128, scale=4)["gflops"] / info["gflops"]
    assert 3.9 < ratio < 4.0
    paper = describe_complexity(MCFormerConfig(), 128, scale=4)
    assert paper["parameters"] == 26_509_267 and 40 < paper["gflops"] < 80
    with pytest.raises(ValueError, match="hr_size"):
        describe_complexity(cfg, 0)


def block_widths(cfg: MCFormerConfig) -> list[tuple[int, int]]:
    """(channels d, level) of every transformer block of the network, from the layout of docs/method.md §2."""
    dims, top = [cfg.width * 2**i for i in range(cfg.levels)], 2 * cfg.width
    encoder = [(dims[i], i) for i in range(cfg.levels - 1) for _ in range(cfg.blocks[i])]
    latent = [(dims[-1], cfg.levels - 1)] * cfg.blocks[-1]
    decoder = [(dims[i] if i > 0 else top, i) for i in range(cfg.levels - 1) for _ in range(cfg.blocks[i])]
    return encoder + latent + decoder + [(top, 0)] * cfg.refinement_blocks


@pytest.mark.parametrize("g", [1, 2, 4])
def test_a_block_holds_the_closed_form_parameter_count(g):
    d, heads, cond = 16, 2, 8
    h = int(d * 2.5)
    block = ModulatedTransformerBlock(d, heads, 2.5, cond, group_width=g)
    assert block.attn.qkv_dwconv.weight.shape == (3 * d, g, 3, 3)
    assert block.ffn.dwconv.weight.shape == (2 * h, g, 3, 3)
    expected = 4 * d + 4 * d * d + 27 * d * g + heads + 3 * d * h + 18 * h * g + 4 * d * cond + 4 * d
    assert count_parameters(block) == expected


def test_grouped_mixing_adds_exactly_its_weights_and_flops():
    dw, grouped = MCFormerConfig(**TINY, ffn_expansion=2.5), MCFormerConfig(**TINY, **GROUPED)
    blocks = block_widths(dw)
    extra = grouped.mixer_group_width - 1  # inputs per output tap beyond the depth-wise one
    size = 64
    info_dw, info_g = describe_complexity(dw, size), describe_complexity(grouped, size)
    # 3×3 mixing: 3d channels (q, k, v) + 2h (gate, value), 9 taps, per pixel of the block's level
    assert info_g["parameters"] - info_dw["parameters"] == sum(9 * (3 * d + 2 * int(d * 2.5)) * extra
                                                               for d, _ in blocks)
    extra_flops = sum(2 * 9 * (3 * d + 2 * int(d * 2.5)) * extra * (size // 2**level) ** 2 for d, level in blocks)
    assert round((info_g["gflops"] - info_dw["gflops"]) * 1e9) == extra_flops


def test_grouped_mixing_keeps_the_outputs_and_the_kernel_head():
    model = tiny(**GROUPED).eval()
    dw = tiny(ffn_expansion=2.5)
    assert model.kernel_estimator.state_dict().keys() == dw.kernel_estimator.state_dict().keys()
    # the same parameter names; only the 3×3 mixing weights change shape, [C, 1, 3, 3] → [C, g, 3, 3]
    changed = {name for name, value in model.state_dict().items() if value.shape != dw.state_dict()[name].shape}
    assert model.state_dict().keys() == dw.state_dict().keys() and changed
    assert all(name.endswith(("qkv_dwconv.weight", "ffn.dwconv.weight")) for name in changed)
    x_t, t, lr = inputs()
    with torch.no_grad():
        out, kernel = model(x_t, t, lr)
    assert out.shape == (2, 6, 32, 24) and torch.isfinite(out).all()
    assert_valid_kernels(kernel, 2, 7)


def test_mixer_group_width_is_set_from_a_config_and_round_trips():
    from blinddiff.config import config_from_dict, config_to_dict, load_config

    cfg = load_config("tiny", ["model.mixer_group_width=4", "model.ffn_expansion=2.5"])
    assert cfg.model.mixer_group_width == 4 and config_from_dict(config_to_dict(cfg)).model == cfg.model
    assert load_config("tiny").model.mixer_group_width == 1
    with pytest.raises(ValueError, match="model: MCFormerConfig.mixer_group_width=3 "):
        load_config("tiny", ["model.mixer_group_width=3"])


def test_shipped_weights_load_bit_identically_with_depthwise_mixing():
    from blinddiff import checkpoint

    path = checkpoint.resolve_weights("fast-x4")
    state, cfg, _ = checkpoint.load_weights(path)
    assert cfg.model.mixer_group_width == 1  # written before the option existed: the default
    model = MCFormer(cfg.model)
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    assert model.latent[0].attn.qkv_dwconv.groups == model.latent[0].attn.qkv_dwconv.in_channels


# --- numerics ----------------------------------------------------------------


def test_batch_consistency():
    model = tiny(heads=(1, 2, 2, 4)).eval()
    x_t, t, lr = inputs(2, 40, 28)
    with torch.no_grad():
        both, k_both = model(x_t, t, lr)
        for i in range(2):
            one, k_one = model(x_t[i:i + 1], t[i:i + 1], lr[i:i + 1])
            torch.testing.assert_close(both[i:i + 1], one, atol=1e-5, rtol=0)
            torch.testing.assert_close(k_both[i:i + 1], k_one, atol=1e-6, rtol=0)


def test_gradients_reach_every_parameter():
    model = tiny(heads=(1, 2, 2, 4))
    x_t, t, lr = inputs()
    x_t.requires_grad_(True)
    out, kernel = model(x_t, t, lr)
    (out.square().mean() + kernel.square().sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    parts = {
        "kernel_estimator": [model.kernel_estimator], "time_embedding": [model.time_embedding],
        "kernel_embedding": [model.kernel_embedding], "encoder": [model.encoders, model.downs],
        "latent": [model.latent], "decoder": [model.ups, model.reduces, model.decoders],
        "refinement": [model.refinement], "io": [model.patch_embed, model.output],
    }
    assert set(parts) == set(model.parameter_groups())
    for name, modules in parts.items():
        norm = sum(p.grad.norm() for m in modules for p in m.parameters())
        assert norm > 0, name
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0  # needed by the kernel-aware gradient


def test_bf16_autocast_close_to_fp32():
    model = tiny().eval()
    x_t, t, lr = inputs()
    with torch.no_grad():
        ref, k_ref = model(x_t, t, lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, kernel = model(x_t, t, lr)
    assert kernel.dtype == torch.float32
    assert_valid_kernels(kernel, 2, 7)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def assert_same_function(module, naive, inputs, atol=1e-5):
    """module(*inputs) equals naive(*inputs), and so do the gradients w.r.t. the inputs and every parameter
    (training), and w.r.t. the inputs alone with frozen parameters (the guided sampler's backward)."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = module(*inputs)
    expected = naive(*inputs)
    torch.testing.assert_close(out, expected, atol=atol, rtol=1e-5)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    wrt = inputs + list(module.parameters())
    got = torch.autograd.grad((out * weights).sum(), wrt)
    want = torch.autograd.grad((expected * weights).sum(), wrt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol * 10, rtol=1e-4)
    module.requires_grad_(False)
    try:
        got = torch.autograd.grad((module(*inputs) * weights).sum(), inputs)
    finally:
        module.requires_grad_(True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol * 10, rtol=1e-4)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("group_width", [1, 4])
def test_transposed_attention_matches_naive_formula(heads, channels_last, group_width):
    torch.manual_seed(0)
    attn = TransposedAttention(8, heads=heads, group_width=group_width)
    with torch.no_grad():
        attn.temperature.copy_(torch.tensor([0.5, 2.0][:heads]).view(heads, 1, 1))
    x = torch.randn(2, 8, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def naive(x):
        q, k, v = attn.qkv_dwconv(F.conv2d(x, attn.qkv.weight)).chunk(3, dim=1)
        q, k, v = (z.reshape(2, heads, 8 // heads, 35) for z in (q, k, v))
        a = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * attn.temperature
        return F.conv2d((a.softmax(-1) @ v).reshape(2, 8, 5, 7), attn.project_out.weight)

    assert_same_function(attn, naive, [x])


def assert_gradient_matches_finite_differences(f, x: torch.Tensor, directions: int = 6, h: float = 1e-2) -> None:
    """The autograd gradient of the scalar f at x agrees with central differences along random directions, to
    1e-3 of its norm (fp32 differences reach 2e-4 here; a 10 % error in one input gradient of the cosine
    attention's hand-written backward shows as 5e-3, of the depth-wise convolution's as 4e-2)."""
    leaf = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(leaf), [leaf])
    assert torch.isfinite(grad).all() and grad.norm() > 0
    for seed in range(directions):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            difference = (f(x + h * v) - f(x - h * v)) / (2 * h)
        assert abs(float((grad * v).sum() - difference)) < 1e-3 * float(grad.norm()), seed


def test_input_gradients_match_finite_differences():
    # The guided sampler back-propagates through the frozen network (docs/method.md §4), through the
    # hand-written backwards of the fast paths; without the output residual the whole gradient is the network's.
    model = tiny(heads=(1, 2, 2, 4), output_residual=False).eval().requires_grad_(False)
    x_t, t, lr = inputs(2, 16, 16)
    weights = torch.randn(2, 6, 16, 16, generator=torch.Generator().manual_seed(5))
    assert_gradient_matches_finite_differences(lambda x: (model(x, t, lr)[0] * weights).sum(), x_t)
    assert_gradient_matches_finite_differences(lambda y: (model(x_t, t, y)[0] * weights).sum(), lr)


def test_attention_gradient_with_a_zero_channel():
    # A channel of q that is zero everywhere has a clamped norm, like F.normalize: the input gradient stays the
    # derivative of the attention (the zero channel contributes nothing), not NaN.
    torch.manual_seed(0)
    attn = TransposedAttention(4, heads=1)
    with torch.no_grad():
        attn.qkv.weight[0].zero_()
    x = torch.randn(1, 4, 6, 6)
    weights = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    assert_gradient_matches_finite_differences(lambda z: (attn(z) * weights).sum(), x)


@pytest.mark.parametrize("group_width", [1, 3])
def test_gated_feed_forward_matches_naive_formula(group_width):
    torch.manual_seed(0)
    ffn = GatedFeedForward(6, 2.66, group_width)  # 15 hidden channels
    x = torch.randn(2, 6, 5, 4).contiguous(memory_format=torch.channels_last)

    def naive(x):
        gate, value = ffn.dwconv(ffn.project_in(x)).chunk(2, dim=1)
        return ffn.project_out(F.gelu(gate) * value)

    assert_same_function(ffn, naive, [x])


@pytest.mark.parametrize("batch", [1, 2])
def test_modulated_layer_norm_matches_naive_formula(batch):
    torch.manual_seed(0)
    norm = ModulatedLayerNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6) + 0.5)
        norm.bias.copy_(torch.randn(6))
    x, shift, scale = torch.randn(batch, 6, 4, 3) * 3 + 1, torch.randn(batch, 6), torch.randn(batch, 6)

    def naive(x, shift, scale):
        mu = x.mean(1, keepdim=True)
        var = x.var(1, keepdim=True, unbiased=False)
        ln = (x - mu) / torch.sqrt(var + 1e-5) * norm.weight[:, None, None] + norm.bias[:, None, None]
        return ln * (1 + scale[:, :, None, None]) + shift[:, :, None, None]

    assert_same_function(norm, naive, [x, shift, scale])


def test_input_gradient_is_batch_consistent():
    # The guided sampler back-propagates to x_t only; a batch must give each image its own gradient.
    model = tiny(heads=(1, 2, 2, 4)).eval().requires_grad_(False)
    x_t, t, lr = inputs(2, 32, 24)
    weights = torch.randn(2, 6, 32, 24, generator=torch.Generator().manual_seed(5))

    def input_grad(x, t, lr, w):
        x = x.clone().requires_grad_(True)
        out, kernel = model(x, t, lr)
        return torch.autograd.grad((out * w).sum() + 10 * kernel[:, 3, 3].sum(), [x])[0]

    both = input_grad(x_t, t, lr, weights)
    for i in range(2):
        one = input_grad(x_t[i:i + 1], t[i:i + 1], lr[i:i + 1], weights[i:i + 1])
        torch.testing.assert_close(both[i:i + 1], one, atol=1e-5, rtol=1e-4)


def test_sinusoidal_time_features():
    from blinddiff.model import sinusoidal_embedding

    t = torch.tensor([0, 7, 999])
    emb = sinusoidal_embedding(t, 8)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = 1e4 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(emb[2, :4], torch.sin(999 * freqs))
    torch.testing.assert_close(emb[2, 4:], torch.cos(999 * freqs))


# --- validation --------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(blocks=(), heads=()), "at least one level"),
        (dict(heads=(1, 1, 1)), "one head count per level"),
        (dict(width=7), "even"),
        (dict(heads=(3, 1, 1, 1)), "heads"),
        (dict(kernel_head="gaussian"), "kernel_head"),
        (dict(kernel_head="pca", pca_code_length=50), "pca_code_length"),
        (dict(estimator_depth=0), "estimator_depth"),
        (dict(width=0), "width"),
        (dict(ffn_expansion=0.0), "ffn_expansion"),
        (dict(blocks=(1, 1.5, 1, 1)), "integers"),
        (dict(blocks=(1, -1, 1, 1)), "blocks"),
        (dict(refinement_blocks=-1), "refinement_blocks"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(mixer_group_width=0), "mixer_group_width"),
        (dict(mixer_group_width=3), r"mixer_group_width=3 .*allowed values here: \[1\]"),  # width 8
        (dict(mixer_group_width=8, ffn_expansion=2.5), r"allowed values here: \[1, 2, 4\]"),  # hidden 20
        (dict(mixer_group_width=4), r"allowed values here: \[1\], or set ffn_expansion=3 "),  # hidden 21
    ],
)
def test_invalid_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        MCFormerConfig(**{**TINY, **overrides})


def test_invalid_inputs_raise():
    model = tiny()
    x_t, t, lr = inputs()
    with pytest.raises(ValueError, match="x_t"):
        model(x_t[:, :2], t, lr)
    with pytest.raises(ValueError, match="lr"):
        model(x_t, t, lr[:1])
    with pytest.raises(ValueError, match="t must"):
        model(x_t, t[:1].repeat(3), lr)


def test_config_is_a_plain_dataclass():
    cfg = MCFormerConfig(blocks=[2, 2], heads=[1, 2], width=16)  # lists (YAML) become tuples
    assert cfg.blocks == (2, 2) and cfg.heads == (1, 2) and cfg.size_multiple == 2
    assert dataclasses.asdict(cfg)["kernel_head"] == "full"
    model = MCFormer(cfg)
    out, kernel = model(torch.randn(1, 3, 9, 11), torch.tensor([1]), torch.rand(1, 3, 3, 3))
    assert out.shape == (1, 6, 9, 11) and kernel.shape == (1, 21, 21)
    # One level: no down/up sampling, no padding, odd width allowed.
    flat = MCFormer(MCFormerConfig(**{**TINY, "width": 5, "blocks": (1,), "heads": (1,)}))
    out, _ = flat(torch.randn(1, 3, 7, 5), torch.tensor([1]), torch.rand(1, 3, 7, 5))
    assert out.shape == (1, 6, 7, 5) and flat.cfg.size_multiple == 1


@pytest.mark.parametrize("size", [(32, 24), (13, 22)])
def test_space_to_depth_stem_keeps_shapes_and_runs_at_lr_resolution(size):
    model = tiny(patch_size=4, blocks=(1, 1), heads=(1, 1), residual_over="lr").eval()
    assert model.cfg.size_multiple == 8
    x_t, t, lr = inputs(h=size[0], w=size[1])
    with torch.no_grad():
        out, kernel = model(x_t, t, lr)
    assert out.shape == (2, 6, *size)
    assert_valid_kernels(kernel, 2, 7)
    seen = []
    hook = model.latent.register_forward_hook(lambda m, args, out: seen.append(out.shape[-2:]))
    with torch.no_grad():
        model(*inputs(h=32, w=24))
    hook.remove()
    assert tuple(seen[0]) == (32 // 8, 24 // 8)  # stem /4, one halving


def test_residual_over_lr_adds_the_upsampled_lr():
    with_res = tiny(residual_over="lr").eval()
    without = tiny(output_residual=False).eval()
    without.load_state_dict(with_res.state_dict())
    x_t, t, lr = inputs()
    with torch.no_grad():
        a, _ = with_res(x_t, t, lr)
        b, _ = without(x_t, t, lr)
    up = with_res.upsample_lr(lr, x_t.shape[-2:])
    torch.testing.assert_close(a[:, :3] - b[:, :3], up, atol=1e-5, rtol=0)
    torch.testing.assert_close(a[:, 3:], b[:, 3:])
