"""MCFormer: the kernel-modulated denoising transformer of BlindDiff (docs/method.md §2).

One network does two jobs at every reverse step t (docs/method.md §4):
  * a small CNN estimates the blur kernel k̂_t from (x_t, bicubic↑y);
  * a Restormer-style U-shaped transformer predicts ε (and the learned-variance
    interpolation value v) from concat(x_t, ↑y), with every block modulated by
    c = t_emb + k_emb (time embedding + embedding of the estimated kernel).

The file reads top to bottom in the order the blocks are used:
norm → modulation → attention (MDTA) → feed-forward (GDFN) → transformer block →
kernel estimator → embeddings → down/up → the network. Each block's docstring gives its plain
formula (what the tests check); the hand-written fast paths it runs on (1×1 convolutions as
matrix products, depth-wise 3×3 and cosine attention with cheap backwards) come last, under
"Fast paths".

Parameter count of the paper preset (``MCFormerConfig()``): 26,509,267, exactly the
authors' release (docs/method.md §2), as ``MCFormer.parameter_groups()`` reports it:

================  ==========  ===========================================================
part              parameters  made of
================  ==========  ===========================================================
kernel_estimator     317,097  conv5×5 6→48 + 5 × conv5×5 48→48 (with biases), 1×1 48→441
time_embedding        18,672  Linear(48→192), Mish, Linear(192→48)
kernel_embedding      23,568  Linear(441→48), Mish, Linear(48→48)
encoder            3,673,070  2·40,687 + 3·136,688 + 6·493,984 (blocks) + 217,728 (downs)
latent            14,972,560  8·1,871,570
decoder            7,223,150  6·493,984 + 3·136,688 + 2·136,687 (blocks, levels 3→1)
                              + 3,483,648 (ups) + 92,160 (1×1 reduces at levels 3, 2)
refinement           273,374  2·136,687
io                     7,776  3×3 conv 6→48 in, 3×3 conv 96→6 out (no bias)
================  ==========  ===========================================================

One block at d channels (h = int(2.66·d) hidden, conditioning width C = 48, g = ``mixer_group_width``
channels per group of the 3×3 mixing convs, 1 = depth-wise in the paper) holds
4d (two LayerNorms, weight + bias) + 4d² + 27d·g + heads (MDTA: 1×1 qkv, grouped 3×3,
1×1 out, temperatures) + 3dh + 18h·g (GDFN) + 4d·C + 4d (modulation Linear with bias);
every conv of the backbone is bias-free (Restormer's ``bias=False``). The decoder mirrors the
encoder's block counts (levels 3, 2, 1 get blocks[2], blocks[1], blocks[0]); level 1 of the
decoder and the refinement run at 2C channels, hence 136,687 = a 96-channel block with 1 head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MCFormerConfig", "MCFormer", "count_parameters", "describe_complexity"]

_KERNEL_HEADS = ("full", "pca")
_RESIDUALS = ("x_t", "lr")


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


@dataclass
class MCFormerConfig:
    """Hyper-parameters of MCFormer; the defaults are the paper preset (docs/method.md §2)."""

    channels: int = 3
    width: int = 48  # C at level 1
    blocks: tuple[int, ...] = (2, 3, 6, 8)  # encoder levels …, latent (decoder mirrors the encoder)
    heads: tuple[int, ...] = (1, 2, 4, 8)
    refinement_blocks: int = 2
    ffn_expansion: float = 2.66
    kernel_size: int = 21
    estimator_depth: int = 6  # conv layers in the kernel estimator
    estimator_width: int = 48
    kernel_head: str = "full"  # "full" (softmax over k*k, the release) | "pca" (paper: PCA code)
    pca_code_length: int = 10
    kernel_modulation: bool = True  # Table 3 ablation: False → modulation from time embedding only
    learned_variance: bool = True  # output 2*channels (eps + variance interpolation v) else channels
    output_residual: bool = True  # add a residual to the first C output channels (not to v)
    residual_over: str = "x_t"  # what output_residual adds: "x_t" (ε-prediction, the release) | "lr" (↑y, x0-prediction)
    # Space-to-depth stem: the input is pixel-unshuffled by patch_size (and the output pixel-shuffled), so the
    # whole backbone and the kernel estimator run at H/p × W/p. 1 = the paper (full HR resolution); p = scale
    # puts the top level at LR resolution, where the information is (the CPU-efficient presets).
    patch_size: int = 1
    time_hidden_mult: int = 4  # hidden width of the time MLP = time_hidden_mult * width (release: 4)
    # Channels per group of the 3×3 spatial mixing convs of MDTA (on q, k, v) and GDFN (on gate, value):
    # 1 = depth-wise, the paper. g > 1 mixes g channels per group (groups = channels // g), denser work for
    # a CPU's matrix units; g must divide every block width and every GDFN hidden width int(d·ffn_expansion).
    mixer_group_width: int = 1

    def __post_init__(self) -> None:
        self.blocks, self.heads = _int_tuple("blocks", self.blocks), _int_tuple("heads", self.heads)
        for name in ("channels", "width", "kernel_size", "estimator_depth", "estimator_width",
                     "pca_code_length", "time_hidden_mult", "refinement_blocks", "patch_size",
                     "mixer_group_width"):
            value = getattr(self, name)
            low = 0 if name == "refinement_blocks" else 1
            if not _is_int(value) or value < low:
                raise ValueError(f"MCFormerConfig.{name} must be an integer >= {low}, got {value!r}")
        if len(self.blocks) < 1:
            raise ValueError("MCFormerConfig.blocks must name at least one level (the latent), got ()")
        if len(self.heads) != len(self.blocks):
            raise ValueError(
                f"MCFormerConfig.heads has {len(self.heads)} entries but blocks has {len(self.blocks)}; "
                "give one head count per level"
            )
        if any(b < 0 for b in self.blocks):
            raise ValueError(f"MCFormerConfig.blocks must be >= 0 per level, got {self.blocks}")
        if self.levels > 1 and self.width % 2:
            raise ValueError(f"MCFormerConfig.width must be even for a multi-level network, got {self.width}")
        for level, heads in enumerate(self.heads):
            dim = self.width * 2**level
            if heads < 1 or dim % heads:
                raise ValueError(
                    f"level {level + 1} runs at {dim} channels, which {heads} heads do not divide; "
                    "pick heads that divide width * 2**level"
                )
        if not self.ffn_expansion > 0 or int(self.width * self.ffn_expansion) < 1:
            raise ValueError(f"MCFormerConfig.ffn_expansion must be > 0, got {self.ffn_expansion}")
        _check_mixer_group_width(self)
        if self.residual_over not in _RESIDUALS:
            raise ValueError(f"MCFormerConfig.residual_over must be one of {_RESIDUALS}, got {self.residual_over!r}")
        if self.kernel_head not in _KERNEL_HEADS:
            raise ValueError(f"MCFormerConfig.kernel_head must be one of {_KERNEL_HEADS}, got {self.kernel_head!r}")
        if self.kernel_head == "pca" and self.pca_code_length > self.kernel_size**2:
            raise ValueError(
                f"pca_code_length={self.pca_code_length} exceeds kernel_size**2={self.kernel_size**2}; "
                "use at most one code entry per kernel tap"
            )

    @property
    def levels(self) -> int:
        return len(self.blocks)

    @property
    def out_channels(self) -> int:
        return 2 * self.channels if self.learned_variance else self.channels

    @property
    def size_multiple(self) -> int:
        """H and W are padded to a multiple of this inside the network (the stem, then one halving per level)."""
        return self.patch_size * 2 ** (self.levels - 1)


def _check_mixer_group_width(cfg: MCFormerConfig) -> None:
    """``mixer_group_width`` must divide the channels of every grouped 3×3 conv: the block widths
    width·2^i (the top decoder level and the refinement run at 2·width, one of them) and the GDFN hidden
    widths int(d·ffn_expansion)."""
    g = cfg.mixer_group_width
    widths = [cfg.width * 2**level for level in range(cfg.levels)]
    hidden = [int(d * cfg.ffn_expansion) for d in widths]
    if all(c % g == 0 for c in widths + hidden):
        return
    common = math.gcd(*widths, *hidden)
    allowed = [v for v in range(1, common + 1) if common % v == 0]
    hint = ""
    if all(d % g == 0 for d in widths):
        # an expansion (3 decimals) that rounds the top hidden width up to a multiple of g, if every level follows
        expansion = math.ceil(math.ceil(hidden[0] / g) * g / cfg.width * 1000) / 1000
        if all(int(d * expansion) % g == 0 for d in widths):
            hint = f", or set ffn_expansion={expansion:g} (hidden widths {[int(d * expansion) for d in widths]})"
    raise ValueError(
        f"MCFormerConfig.mixer_group_width={g} must divide the channels of every grouped 3×3 conv: the block "
        f"widths {widths} and the GDFN hidden widths {hidden} (int(d·ffn_expansion)); allowed values here: "
        f"{allowed}{hint}"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(name: str, value: object) -> tuple[int, ...]:
    """Lists from YAML become tuples; anything but a sequence of integers is rejected."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"MCFormerConfig.{name} must be a sequence of integers, got {value!r}")
    items = tuple(value)  # type: ignore[arg-type]
    if not all(_is_int(v) for v in items):
        raise ValueError(f"MCFormerConfig.{name} must contain integers only, got {value!r}")
    return items


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (trainable or not); a grouped conv holds Cout·(Cin/groups)·k²
    weights, so a block's 3×3 mixing holds 27d·g + 18h·g (module docstring)."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------
# Norm and modulation
# ---------------------------------------------------------------------------


class ModulatedLayerNorm(nn.Module):
    """Channel LayerNorm (Restormer "WithBias") followed by the kernel modulation (docs/method.md §2):
    ``y = (w·x̂ + b)·(1 + scale) + shift``, x̂ = (x − mean) / √(var + eps) over the channels of each pixel.

    How it runs: the LayerNorm affine (w, b) and the per-sample modulation are folded into one per-sample
    affine ``x̂·(w·(1+scale)) + (b·(1+scale) + shift)``: for a single image that is a plain
    LayerNorm affine, so forward and backward are one fused kernel each; a batch normalises, then
    applies the affine in a second pass. Normalisation and affine run in fp32 (safe under bf16
    autocast); the following 1×1 conv casts back.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        # x: [B, d, H, W]; shift, scale: [B, d]
        dim = x.shape[1]
        x = x.float().permute(0, 2, 3, 1)  # channels-last view: layer_norm normalises the trailing dim
        gain = self.weight * (1 + scale.float())  # [B, d]
        offset = self.bias * (1 + scale.float()) + shift.float()  # [B, d]
        if x.shape[0] == 1:
            # The fused backward also gives ∂/∂gain and ∂/∂offset, through which the kernel branch
            # receives the guided sampler's gradient.
            y = F.layer_norm(x, (dim,), gain[0], offset[0], eps=self.eps)  # [1, H, W, d]
        else:
            x_hat = F.layer_norm(x, (dim,), eps=self.eps)  # [B, H, W, d]
            y = torch.addcmul(offset[:, None, None, :], x_hat, gain[:, None, None, :])
        return y.permute(0, 3, 1, 2)  # [B, d, H, W] (channels-last memory)


# ---------------------------------------------------------------------------
# Multi-Dconv head transposed attention (MDTA)
# ---------------------------------------------------------------------------


class TransposedAttention(nn.Module):
    """MDTA (Restormer): attention across channels, so cost is linear in H·W (docs/method.md §2).

    ``y = project_out(softmax(T·q̂k̂ᵀ)·v)`` for each head, with (q, k, v) = dwconv3×3(qkv(x)) split in
    thirds (the 3×3 conv depth-wise, or in groups of ``group_width`` channels), a head's c = d/heads
    channels taken as rows of length H·W, q̂ and k̂ those rows L2-normalised, and T the head's learned
    temperature: the attention matrix is c×c.

    How it runs (fast paths, end of file): q, k, v from their thirds of the weights, the cosine Gram
    matrix and the depth-wise convolutions (g = 1) with hand-written backwards, and for one head the output
    projection folded into the attention matrix.
    """

    def __init__(self, dim: int, heads: int, group_width: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, kernel_size=1, bias=False)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, kernel_size=3, padding=1, groups=3 * dim // group_width,
                                    bias=False)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, d, H, W] in channels-last memory, so the views below are free.
        b, d, h, w = x.shape
        c = d // self.heads
        # q, k, v from their own thirds of the 1×1 and 3×3 weights: three contiguous maps, so the
        # backward adds three gradients instead of stacking them into a 3d-channel buffer.
        q, k, v = (
            _grouped3x3(_pointwise(x, w_in), w_dw).permute(0, 2, 3, 1).reshape(b, h * w, self.heads, c)
            for w_in, w_dw in zip(self.qkv.weight.split(d), self.qkv_dwconv.weight.split(d))
        )  # [B, HW, heads, c] each
        cos = _CosineGram.apply(q.permute(0, 2, 3, 1), k.permute(0, 2, 3, 1))  # [B, heads, c, c]
        attn = (cos * self.temperature).softmax(dim=-1)  # softmax over channels, in fp32
        if self.heads == 1:
            # One head: fold the output projection into the c×c attention matrix, y = v·(Wo·attn)ᵀ,
            # one [HW, d]×[d, d] product instead of two.
            mix = attn[:, 0].transpose(-2, -1) @ self.project_out.weight.view(d, d).t().to(attn.dtype)  # [B, d, d]
            out = v.reshape(b, h * w, d) @ mix.to(v.dtype)  # [B, HW, d]
            return out.view(b, h, w, d).permute(0, 3, 1, 2)  # [B, d, H, W], channels-last
        out = v.transpose(1, 2) @ attn.to(v.dtype).transpose(-2, -1)  # [B, heads, HW, c]
        out = out.transpose(1, 2).reshape(b, h, w, d).permute(0, 3, 1, 2)  # [B, d, H, W], channels-last
        return _pointwise(out, self.project_out.weight)


# ---------------------------------------------------------------------------
# Gated-Dconv feed-forward network (GDFN)
# ---------------------------------------------------------------------------


class GatedFeedForward(nn.Module):
    """GDFN (Restormer): ``y = project_out(GELU(g) ⊙ v)``, (g, v) = dwconv3×3(project_in(x)) split in halves
    (the 3×3 conv depth-wise, or in groups of ``group_width`` channels).

    How it runs: g and v come from their own halves of the weights (fast paths, end of file).
    """

    def __init__(self, dim: int, expansion: float, group_width: int = 1) -> None:
        super().__init__()
        self.hidden = hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, 2 * hidden, kernel_size=1, bias=False)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, kernel_size=3, padding=1, groups=2 * hidden // group_width,
                                bias=False)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # gate and value from their own halves of the weights (not a chunk of one 2·hidden map): each is
        # contiguous, so GELU and the product run vectorised, and the backward needs no concatenation.
        gate, value = (
            _grouped3x3(_pointwise(x, w_in), w_dw)
            for w_in, w_dw in zip(self.project_in.weight.split(self.hidden), self.dwconv.weight.split(self.hidden))
        )  # [B, hidden, H, W] each
        return _pointwise(F.gelu(gate) * value, self.project_out.weight)


# ---------------------------------------------------------------------------
# Kernel-modulated transformer block
# ---------------------------------------------------------------------------


class ModulatedTransformerBlock(nn.Module):
    """x += MDTA(mod(LN(x))); x += GDFN(mod(LN(x))), with (shift, scale) from c (docs/method.md §2).

    ``cond`` is Mish(c) [B, cond_dim], computed once per forward by the network (the release
    applies Mish inside every block; same result).
    """

    def __init__(self, dim: int, heads: int, expansion: float, cond_dim: int, group_width: int = 1) -> None:
        super().__init__()
        self.norm1 = ModulatedLayerNorm(dim)
        self.attn = TransposedAttention(dim, heads, group_width)
        self.norm2 = ModulatedLayerNorm(dim)
        self.ffn = GatedFeedForward(dim, expansion, group_width)
        self.modulation = nn.Linear(cond_dim, 4 * dim)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        # x: [B, d, H, W]; cond: [B, cond_dim]
        shift_attn, scale_attn, shift_ffn, scale_ffn = self.modulation(cond).chunk(4, dim=1)  # [B, d] each
        x = x + self.attn(self.norm1(x, shift_attn, scale_attn))
        x = x + self.ffn(self.norm2(x, shift_ffn, scale_ffn))
        return x


class BlockStack(nn.ModuleList):
    """A sequence of modulated blocks sharing one conditioning vector."""

    def __init__(self, count: int, dim: int, heads: int, expansion: float, cond_dim: int,
                 group_width: int = 1) -> None:
        super().__init__(ModulatedTransformerBlock(dim, heads, expansion, cond_dim, group_width)
                         for _ in range(count))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:  # type: ignore[override]
        for block in self:
            x = block(x, cond)
        return x


# ---------------------------------------------------------------------------
# Kernel estimator
# ---------------------------------------------------------------------------


class KernelEstimator(nn.Module):
    """Kernel-estimator trunk on concat(x_t, ↑y) (docs/method.md §2): ``depth`` conv5×5 + LeakyReLU(0.2) layers
    (one with stride 2, as the release), global average pooling, 1×1 projection.

    Returns the raw head output [B, outputs]: k·k logits (``"full"`` head) or a PCA code
    (``"pca"`` head); ``MCFormer.estimate_kernel`` turns it into a kernel.
    """

    def __init__(self, in_channels: int, width: int, depth: int, outputs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        stride_layer = depth // 2  # the release: the 4th of 6 convs halves the resolution
        for i in range(depth):
            layers += [
                nn.Conv2d(in_channels if i == 0 else width, width, kernel_size=5, padding=2,
                          stride=2 if i == stride_layer else 1),
                nn.LeakyReLU(0.2),
            ]
        self.features = nn.Sequential(*layers)
        self.project = nn.Conv2d(width, outputs, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, 2C, H, W] → [B, outputs]
        feats = self.features(x).mean(dim=(2, 3), keepdim=True)  # [B, width, 1, 1]
        return self.project(feats).flatten(1)


# ---------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 1e4) -> Tensor:
    """[B] timesteps → [B, 2·(dim//2)] features ``[sin(t·f_i), cos(t·f_i)]``, f_i = max_period^(-i/(dim//2)).

    Same layout as the release's ``PositionalEncoding`` (t on the 1000-step scale).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features → Linear → Mish → Linear to width C (docs/method.md §2)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(2 * (width // 2), hidden), nn.Mish(), nn.Linear(hidden, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.width))  # [B, C]


class KernelEmbedding(nn.Module):
    """Flattened kernel → Linear(k·k→C) → Mish → Linear(C→C) (docs/method.md §2)."""

    def __init__(self, kernel_size: int, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(kernel_size * kernel_size, width), nn.Mish(), nn.Linear(width, width))

    def forward(self, kernel: Tensor) -> Tensor:
        return self.mlp(kernel.flatten(1))  # [B, C]


# ---------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------


class Downsample(nn.Sequential):
    """[B, d, H, W] → [B, 2d, H/2, W/2]: 3×3 conv d→d/2, PixelUnshuffle(2)."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Conv2d(dim, dim // 2, kernel_size=3, padding=1, bias=False), nn.PixelUnshuffle(2))


class Upsample(nn.Sequential):
    """[B, d, H, W] → [B, d/2, 2H, 2W]: 3×3 conv d→2d, PixelShuffle(2)."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Conv2d(dim, dim * 2, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2))


# ---------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------


class MCFormer(nn.Module):
    """Kernel-modulated Restormer predicting (ε, v) and the blur kernel k̂_t (docs/method.md §2)."""

    def __init__(self, cfg: MCFormerConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else MCFormerConfig()
        self.cfg = cfg
        c, exp, levels, g = cfg.width, cfg.ffn_expansion, cfg.levels, cfg.mixer_group_width
        dims = [c * 2**i for i in range(levels)]

        taps = cfg.kernel_size**2
        head_outputs = taps if cfg.kernel_head == "full" else cfg.pca_code_length
        stem_channels = 2 * cfg.channels * cfg.patch_size**2  # concat(x_t, ↑y), pixel-unshuffled by p
        self.kernel_estimator = KernelEstimator(stem_channels, cfg.estimator_width, cfg.estimator_depth,
                                                head_outputs)
        if cfg.kernel_head == "pca":
            # Placeholder PCA decoder until the trainer fits one on training kernels (set_kernel_basis):
            # a uniform mean kernel and unit vectors on the central taps, so every code decodes to a
            # valid kernel and gradients flow from the start.
            basis = torch.zeros(cfg.pca_code_length, taps)
            first = (taps - cfg.pca_code_length) // 2
            rows = torch.arange(cfg.pca_code_length)
            basis[rows, first + rows] = 1.0 / taps
            self.register_buffer("kernel_pca_mean", torch.full((taps,), 1.0 / taps))
            self.register_buffer("kernel_pca_basis", basis)
        self.time_embedding = TimestepEmbedding(c, cfg.time_hidden_mult * c)
        self.kernel_embedding = KernelEmbedding(cfg.kernel_size, c) if cfg.kernel_modulation else None

        self.patch_embed = nn.Conv2d(stem_channels, c, kernel_size=3, padding=1, bias=False)
        # Encoder: levels 1 … L-1, each followed by a downsampler.
        self.encoders = nn.ModuleList(BlockStack(cfg.blocks[i], dims[i], cfg.heads[i], exp, c, g)
                                      for i in range(levels - 1))
        self.downs = nn.ModuleList(Downsample(dims[i]) for i in range(levels - 1))
        self.latent = BlockStack(cfg.blocks[-1], dims[-1], cfg.heads[-1], exp, c, g)
        # Decoder, deepest level first: upsample, concat skip, 1×1 reduce except at level 1.
        self.ups = nn.ModuleList(Upsample(dims[i + 1]) for i in reversed(range(levels - 1)))
        self.reduces = nn.ModuleList(
            nn.Conv2d(2 * dims[i], dims[i], kernel_size=1, bias=False) if i > 0 else nn.Identity()
            for i in reversed(range(levels - 1))
        )
        self.decoders = nn.ModuleList(
            BlockStack(cfg.blocks[i], dims[i] if i > 0 else 2 * c, cfg.heads[i], exp, c, g)
            for i in reversed(range(levels - 1))
        )
        top = 2 * c if levels > 1 else c  # the level-1 decoder output keeps the concatenated width
        self.refinement = BlockStack(cfg.refinement_blocks, top, cfg.heads[0], exp, c, g)
        self.output = nn.Conv2d(top, cfg.out_channels * cfg.patch_size**2, kernel_size=3, padding=1, bias=False)

    # -- kernel branch -----------------------------------------------------

    def estimate_kernel(self, x_t: Tensor, lr_up: Tensor) -> Tensor:
        """k̂_t [B, k, k] (non-negative, sums to 1) from x_t and the upsampled LR, both [B, C, H, W]."""
        return self._kernel_from_stem(self._stem(x_t, lr_up))

    def _kernel_from_stem(self, stem: Tensor) -> Tensor:
        """k̂_t from the stem input (see `_stem`).

        ``"full"`` head: softmax over k·k logits (the release). ``"pca"`` head (the paper): the code
        is decoded with the PCA basis, clamped ≥ 0 and renormalised.
        """
        k = self.cfg.kernel_size
        head = self.kernel_estimator(stem).float()  # [B, k*k] or [B, L]
        if self.cfg.kernel_head == "full":
            return head.softmax(dim=1).view(-1, k, k)
        flat = torch.addmm(self.kernel_pca_mean.float(), head, self.kernel_pca_basis.float())  # [B, k*k]
        flat = F.relu(flat) + 1e-8  # relu + eps: always a valid kernel, gradients flow through positive taps
        return (flat / flat.sum(dim=1, keepdim=True)).view(-1, k, k)

    def _stem(self, x_t: Tensor, lr_up: Tensor) -> Tensor:
        """concat(x_t, ↑y) [B, 2C, H, W] padded to `size_multiple` and pixel-unshuffled by `patch_size`:
        [B, 2C·p², H'/p, W'/p] in channels-last memory, the input of the kernel estimator and the backbone."""
        h, w = x_t.shape[-2:]
        m = self.cfg.size_multiple
        # the padded size written as m·⌈H/m⌉ with non-negative operands, so that an exporter's symbolic shapes
        # see a multiple of m and its integer division (ONNX Div truncates) is exact
        pad_h, pad_w = (h + m - 1) // m * m - h, (w + m - 1) // m * m - w
        x = torch.cat([x_t, lr_up], dim=1)  # [B, 2C, H, W]
        # An exported graph serves every size, so it always pads (by 0 on a multiple) and reflects (its inputs
        # are at least one multiple wide: `onnx_export.min_input_size`).
        exporting = torch.compiler.is_exporting()
        if pad_h or pad_w or exporting:
            mode = "reflect" if exporting or (pad_h < h and pad_w < w) else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)  # [B, 2C, H', W']
        if self.cfg.patch_size > 1:
            x = F.pixel_unshuffle(x, self.cfg.patch_size)  # [B, 2C·p², H'/p, W'/p]
        return x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def set_kernel_basis(self, mean: Tensor, basis: Tensor) -> None:
        """Install the PCA decoder of the ``"pca"`` kernel head: mean [k*k], basis [L, k*k] (or [.., k, k])."""
        if self.cfg.kernel_head != "pca":
            raise ValueError(f"set_kernel_basis needs kernel_head='pca', this model has {self.cfg.kernel_head!r}")
        taps, length = self.cfg.kernel_size**2, self.cfg.pca_code_length
        mean, basis = mean.reshape(-1), basis.reshape(basis.shape[0], -1)
        if mean.numel() != taps or tuple(basis.shape) != (length, taps):
            raise ValueError(
                f"expected mean with {taps} taps and basis of shape ({length}, {taps}), "
                f"got {tuple(mean.shape)} and {tuple(basis.shape)}"
            )
        self.kernel_pca_mean.copy_(mean)
        self.kernel_pca_basis.copy_(basis)

    # -- forward -----------------------------------------------------------

    def upsample_lr(self, lr: Tensor, size: tuple[int, int]) -> Tensor:
        """Bicubic ↑ of the LR condition to ``size`` (any ratio; used as is when already that size)."""
        if tuple(lr.shape[-2:]) == tuple(size):
            return lr
        return F.interpolate(lr, size=size, mode="bicubic", align_corners=False)

    def forward(self, x_t: Tensor, t: Tensor, lr: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t [B, C, H, W], t [B] on the 1000-step scale, lr [B, C, h, w]) → (out [B, 2C|C, H, W], k̂ [B, k, k])."""
        cfg = self.cfg
        if x_t.ndim != 4 or x_t.shape[1] != cfg.channels:
            raise ValueError(f"x_t must be [B, {cfg.channels}, H, W], got {tuple(x_t.shape)}")
        b, _, h, w = x_t.shape
        if lr.ndim != 4 or lr.shape[:2] != x_t.shape[:2]:
            raise ValueError(f"lr must be [{b}, {cfg.channels}, h, w] like x_t, got {tuple(lr.shape)}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape [{b}], got {tuple(t.shape)}")

        lr_up = self.upsample_lr(lr, (h, w))  # [B, C, H, W]
        stem = self._stem(x_t, lr_up)  # [B, 2C·p², H'/p, W'/p]
        kernel = self._kernel_from_stem(stem)  # [B, k, k]

        cond = self.time_embedding(t)  # [B, C]
        if self.kernel_embedding is not None:
            cond = cond + self.kernel_embedding(kernel)
        cond = F.mish(cond)  # shared input of every block's modulation Linear

        x = self.patch_embed(stem)  # [B, C, H'/p, W'/p]
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x, cond)
            skips.append(x)  # level i: [B, C·2^i, H'/(p·2^i), W'/(p·2^i)]
            x = down(x)
        x = self.latent(x, cond)  # [B, C·2^(L-1), H'/(p·2^(L-1)), W'/(p·2^(L-1))]
        for up, reduce, decoder in zip(self.ups, self.reduces, self.decoders):
            x = reduce(torch.cat([up(x), skips.pop()], dim=1))  # level i>1: [B, C·2^i, …]; level 1: [B, 2C, …]
            x = decoder(x, cond)
        x = self.refinement(x, cond)
        out = self.output(x)  # [B, (2C|C)·p², H'/p, W'/p]
        if cfg.patch_size > 1:
            out = F.pixel_shuffle(out, cfg.patch_size)
        out = out[:, :, :h, :w]  # [B, 2C|C, H, W]

        if cfg.output_residual:
            first = out[:, : cfg.channels] + (x_t if cfg.residual_over == "x_t" else lr_up)
            out = torch.cat([first, out[:, cfg.channels:]], dim=1) if cfg.learned_variance else first
        return out.contiguous(), kernel  # plain NCHW for callers that .view() it

    # -- bookkeeping ---------------------------------------------------------

    def parameter_groups(self) -> dict[str, int]:
        """Parameter counts per part of the network (for ``blinddiff info``); they sum to the total."""
        parts: dict[str, list[nn.Module | None]] = {
            "kernel_estimator": [self.kernel_estimator],
            "time_embedding": [self.time_embedding],
            "kernel_embedding": [self.kernel_embedding],
            "encoder": [self.encoders, self.downs],
            "latent": [self.latent],
            "decoder": [self.ups, self.reduces, self.decoders],
            "refinement": [self.refinement],
            "io": [self.patch_embed, self.output],
        }
        return {name: sum(count_parameters(m) for m in mods if m is not None) for name, mods in parts.items()}


def describe_complexity(cfg: MCFormerConfig, hr_size: int, scale: int = 4) -> dict:
    """Size and compute of the network of ``cfg`` (for ``blinddiff info``).

    Returns ``parameters``, ``parameters_per_part`` (:meth:`MCFormer.parameter_groups`), ``lr_size``
    and ``gflops``: floating-point operations (2 per multiply-add, convolutions and matrix products
    only) of one forward pass on a ``hr_size``² image, batch 1, counted on the meta device, so
    nothing is allocated or computed. A grouped convolution counts Cin/groups multiply-adds per output
    and tap (the counter reads the weight's [Cout, Cin/groups, k, k] shape), so the depth-wise or
    grouped 3×3 mixing of every ``mixer_group_width`` is counted exactly.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not _is_int(hr_size) or hr_size < 1 or not _is_int(scale) or scale < 1:
        raise ValueError(f"hr_size and scale must be integers >= 1, got hr_size={hr_size!r}, scale={scale!r}")
    lr_size = max(1, hr_size // scale)
    with torch.device("meta"):
        model = MCFormer(cfg)
        x_t = torch.zeros(1, cfg.channels, hr_size, hr_size)
        lr = torch.zeros(1, cfg.channels, lr_size, lr_size)
        t = torch.zeros(1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x_t, t, lr)
    return {
        "parameters": count_parameters(model),
        "parameters_per_part": model.parameter_groups(),
        "lr_size": lr_size,
        "gflops": counter.get_total_flops() / 1e9,
    }


# ---------------------------------------------------------------------------
# Fast paths: the formulas above, written for speed (the blocks call them)
# ---------------------------------------------------------------------------

# Layout: the backbone runs in channels-last memory ([B, C, H, W] tensors stored as [B, H, W, C]):
# oneDNN's convolutions are fastest there on CPU, and the channel LayerNorm and the attention's
# reshapes become free views (paper preset, 128×128, 2 CPU cores: 0.26 s per forward vs 0.32 s
# for the same network in NCHW).
#
# Backward: every guided reverse step back-propagates E to x_t through the whole network (docs/method.md §4),
# so the blocks are also written for a cheap input-only backward (frozen weights): no chunk/unbind
# whose backward concatenates (q, k, v and the GDFN halves come from weight slices), hand-written
# backwards for the cosine attention and the depth-wise convolutions (which then keep no input),
# one fused LayerNorm kernel for a single image, and the output projection folded into the
# attention matrix for one head. Paper preset, 1 CPU thread, fp32: a guided step (forward with graph
# + input-only backward) costs 2.15× a plain forward at 128² and 2.2× at 256² (2.4× and 3.6× before
# these changes) and its peak memory is 35–37 % lower; the forward's results are unchanged (≤ 1e-6).


def _pointwise(x: Tensor, weight: Tensor) -> Tensor:
    """1×1 convolution without bias as a matrix product over channels: [B, Cin, H, W] → [B, Cout, H, W].

    weight: [Cout, Cin, 1, 1]. On channels-last input this is one GEMM on a free view, whatever the
    thread count (PyTorch sends single-threaded 1×1 convolutions to a slower im2col path).
    """
    out = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1))  # [B, H, W, Cout]
    return out.permute(0, 3, 1, 2)


class _Depthwise3x3(torch.autograd.Function):
    """Depth-wise 3×3 convolution (zero padding 1, no bias) whose input gradient is the same
    convolution with the kernel rotated by 180°, and which keeps its input for the backward only
    when the weight needs a gradient (autograd's convolution always keeps it)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        out = F.conv2d(x, weight, padding=1, groups=weight.shape[0])
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        channels = weight.shape[0]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(-2, -1).to(grad.dtype), padding=1, groups=channels)
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad, x.to(grad.dtype), weight.to(grad.dtype), None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                channels, [False, True, False])[1]
        return grad_x, grad_w


def _grouped3x3(x: Tensor, weight: Tensor) -> Tensor:
    """3×3 convolution, zero padding 1, no bias, in groups of g channels; weight [C, g, 3, 3].

    Depth-wise (g = 1, the paper) runs the hand-written backward above; wider groups are dense enough
    for autograd's own convolution (``MCFormerConfig.mixer_group_width``).
    """
    if weight.shape[1] == 1:
        return _Depthwise3x3.apply(x, weight)
    return F.conv2d(x, weight, padding=1, groups=weight.shape[0] // weight.shape[1])


class _CosineGram(torch.autograd.Function):
    """Cosine similarities of the rows of q and k: ``q̂k̂ᵀ = (q kᵀ) / (‖q_i‖ ‖k_j‖)``, eps 1e-12 like F.normalize.

    q, k: [B, heads, c, N] (any strides) → [B, heads, c, c] in fp32. The small c×c Gram matrix is divided
    by the norms instead of normalising the full maps (same result as F.normalize). The hand-written
    backward merges the norms' gradient into the Gram matrix's, ∂L/∂q = G·k + s⊙q (G the c×c gradient
    of the Gram matrix, s a per-channel factor): one matmul and one fused multiply-add per input
    instead of autograd's square/sum/sqrt chain and its extra passes over the full maps.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor) -> Tensor:  # type: ignore[override]
        gram = (q @ k.transpose(-2, -1)).float()  # [B, heads, c, c]
        q_norm = q.float().square().sum(-1).sqrt().clamp_min(1e-12)  # [B, heads, c]
        k_norm = k.float().square().sum(-1).sqrt().clamp_min(1e-12)
        cos = gram / (q_norm[..., :, None] * k_norm[..., None, :])
        ctx.save_for_backward(q, k, q_norm, k_norm, cos)
        return cos

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        q, k, q_norm, k_norm, cos = ctx.saved_tensors
        grad_gram = grad / (q_norm[..., :, None] * k_norm[..., None, :])  # [B, heads, c, c]
        weighted = grad * cos
        # ∂cos_ij/∂‖q_i‖ = −cos_ij/‖q_i‖ and ∂‖q_i‖/∂q_i = q_i/‖q_i‖ (zero where the norm was clamped)
        q_scale = -weighted.sum(-1) / q_norm.square() * (q_norm > 1e-12)  # [B, heads, c]
        k_scale = -weighted.sum(-2) / k_norm.square() * (k_norm > 1e-12)
        grad_q = grad_k = None
        # Computed as [B, heads, N, c]: the channels-last layout q and k came from.
        if ctx.needs_input_grad[0]:
            grad_q = k.transpose(-2, -1) @ grad_gram.transpose(-2, -1).to(k.dtype)
            grad_q = grad_q.addcmul_(q.transpose(-2, -1), q_scale[..., None, :].to(q.dtype)).transpose(-2, -1)
        if ctx.needs_input_grad[1]:
            grad_k = q.transpose(-2, -1) @ grad_gram.to(q.dtype)
            grad_k = grad_k.addcmul_(k.transpose(-2, -1), k_scale[..., None, :].to(k.dtype)).transpose(-2, -1)
        return grad_q, grad_k
