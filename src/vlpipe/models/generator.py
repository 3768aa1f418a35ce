"""X-LXMERT's image generator: a grid of codebook centroids -> an image.

X-LXMERT (Cho et al., EMNLP 2020, §3.3) turns the G x G cluster ids it samples from text
into pixels with a generator trained separately on the ground-truth cluster grids of real
images: residual blocks with SPADE normalisation (Park et al., "Semantic Image Synthesis
with Spatially-Adaptive Normalization", CVPR 2019) conditioned on the centroid grid, a
hinge-loss GAN (Lim & Ye 2017; Miyato et al. 2018) and discriminator feature matching
(pix2pixHD, Wang et al. 2018). On the small shapes world a pixel L1 term replaces the
perceptual (VGG) loss of the reference, which needs downloaded weights.

Shapes: B batch, G grid side, D centroid dim, S image side (S = G * 2^(blocks - 1)).
Images are in the world's BGR order, normalised to [-1, 1] like ``vlpipe.data.images``.

Training uses the shared loop (:func:`vlpipe.train.loop.fit`) with one optimizer over
both players: :class:`GanPair` returns the discriminator's hinge loss on a detached fake
and the generator's losses through a *detached copy* of the discriminator's weights, so
one backward pass moves each player by its own loss only (simultaneous updates).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from vlpipe.config import GeneratorParams
from vlpipe.errors import InputError
from vlpipe.io import atomic_dir, read_json
from vlpipe.models.xlxmert import centroid_stats

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LRELU = 0.2  # LeakyReLU slope of SPADE and of the discriminator


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of a generator; saved as ``config.json``."""

    grid: int  # G
    feat_dim: int  # D
    image_size: int  # S
    channels: tuple[int, ...]
    cond_channels: int
    cond_hidden: int

    @classmethod
    def from_params(cls, p: GeneratorParams, *, grid: int, feat_dim: int, image_size: int) -> GeneratorConfig:
        config = cls(grid, feat_dim, image_size, tuple(p.channels), p.cond_channels, p.cond_hidden)
        config.check()
        return config

    def check(self) -> None:
        """The blocks must upsample G to S by doubling: S = G * 2^(len(channels) - 1)."""
        if self.grid * 2 ** (len(self.channels) - 1) != self.image_size:
            need = math.log2(self.image_size / self.grid) + 1 if self.image_size > self.grid else 1
            raise ValueError(
                f"{len(self.channels)} generator blocks upsample a {self.grid}x{self.grid} grid to "
                f"{self.grid * 2 ** (len(self.channels) - 1)} px, but images are {self.image_size} px "
                f"(use {need:g} channel entries)"
            )

    def to_json(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}


# --------------------------------------------------------------------------- generator


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: parameter-free instance norm of x, then a per-pixel
    scale and shift predicted from the condition map at x's resolution.

    The reference predicts gamma/beta with a 3x3 conv MLP per SPADE layer from the condition
    nearest-upsampled to x's size. Our condition is a G x G grid, so the generator computes
    one shared condition trunk at grid resolution (where the 3x3 context lives), upsamples it
    bilinearly once per resolution, and each SPADE maps it to gamma/beta with a 1x1 conv:
    the same family of functions for a fraction of the cost at 64 px.
    """

    def __init__(self, channels: int, cond_channels: int):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.gamma_beta = nn.Conv2d(cond_channels, 2 * channels, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x (B, C, h, w), cond (B, C_cond, h, w)
        gamma, beta = self.gamma_beta(cond).chunk(2, dim=1)  # (B, C, h, w) each
        return self.norm(x) * (1 + gamma) + beta


class SPADEResBlock(nn.Module):
    """SPADE residual block: (SPADE, LeakyReLU, 3x3 conv) x 2; a 1x1 conv shortcut when the
    width changes."""

    def __init__(self, c_in: int, c_out: int, cond_channels: int):
        super().__init__()
        mid = min(c_in, c_out)
        self.norm0 = SPADE(c_in, cond_channels)
        self.conv0 = nn.Conv2d(c_in, mid, 3, padding=1)
        self.norm1 = SPADE(mid, cond_channels)
        self.conv1 = nn.Conv2d(mid, c_out, 3, padding=1)
        self.conv_skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        skip = x if self.conv_skip is None else self.conv_skip(x)
        dx = self.conv0(F.leaky_relu(self.norm0(x, cond), LRELU))
        dx = self.conv1(F.leaky_relu(self.norm1(dx, cond), LRELU))
        return skip + dx


class CentroidGridGenerator(nn.Module):
    """(B, G, G, D) centroid grid -> (B, 3, S, S) image in [-1, 1].

    The centroids are standardised with fixed per-dimension statistics of the codebook
    (buffers); a condition trunk (1x1 conv, then a 3x3 conv that sees neighbouring cells)
    gives the (B, C_cond, G, G) map every SPADE reads; a 3x3 conv of it starts the image at
    G x G and each block after the first doubles the resolution (nearest) first.
    """

    def __init__(self, config: GeneratorConfig, centroid_mean: torch.Tensor, centroid_std: torch.Tensor):
        super().__init__()
        config.check()
        self.config = config
        self.register_buffer("centroid_mean", centroid_mean.detach().clone().float())  # (D,)
        self.register_buffer("centroid_std", centroid_std.detach().clone().float())  # (D,)
        c, cc = config.channels, config.cond_channels
        self.cond = nn.Sequential(
            nn.Conv2d(config.feat_dim, config.cond_hidden, 1),
            nn.LeakyReLU(LRELU),
            nn.Conv2d(config.cond_hidden, cc, 3, padding=1),
            nn.LeakyReLU(LRELU),
        )
        self.stem = nn.Conv2d(cc, c[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            SPADEResBlock(c_in, c_out, cc) for c_in, c_out in zip((c[0], *c[:-1]), c, strict=True)
        )
        self.to_rgb = nn.Conv2d(c[-1], 3, 3, padding=1)

    def condition(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, G, G, D) centroids -> (B, C_cond, G, G) condition map."""
        x = (grid - self.centroid_mean) / self.centroid_std  # (B, G, G, D)
        return self.cond(x.permute(0, 3, 1, 2))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        cond = self.condition(grid)  # (B, C_cond, G, G)
        h = self.stem(cond)  # (B, C0, G, G)
        for i, block in enumerate(self.blocks):
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")  # (B, C, 2h, 2w)
            at_res = (
                cond
                if i == 0
                else F.interpolate(cond, size=h.shape[-2:], mode="bilinear", align_corners=False)
            )
            h = block(h, at_res)
        return torch.tanh(self.to_rgb(F.leaky_relu(h, LRELU)))  # (B, 3, S, S)


# ----------------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN (pix2pix): the image concatenated with a projection of the
    condition grid (nearest-upsampled), strided 4x4 convs, one real/fake logit per patch.

    ``forward`` returns the intermediate activations too (for feature matching).
    """

    def __init__(self, channels: tuple[int, ...], feat_dim: int, cond_channels: int = 8):
        super().__init__()
        self.cond = nn.Conv2d(feat_dim, cond_channels, 1)
        layers, c_in = [], 3 + cond_channels
        for i, c_out in enumerate(channels):
            norm = nn.Identity() if i == 0 else nn.GroupNorm(math.gcd(c_out, 8), c_out)
            layers.append(
                nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), norm, nn.LeakyReLU(LRELU))
            )
            c_in = c_out
        self.layers = nn.ModuleList(layers)
        self.logit = nn.Conv2d(c_in, 1, 3, padding=1)

    def forward(self, image: torch.Tensor, grid: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        # image (B, 3, S, S), grid (B, G, G, D) standardised -> features, logits (B, 1, S/2^n, S/2^n)
        cond = self.cond(grid.permute(0, 3, 1, 2))  # (B, c, G, G)
        h = torch.cat([image, F.interpolate(cond, size=image.shape[-2:], mode="nearest")], dim=1)
        feats = []
        for layer in self.layers:
            h = layer(h)
            feats.append(h)
        return feats, self.logit(h)


# ------------------------------------------------------------------------- training


class GanPair(nn.Module):
    """Generator + discriminator trained by one optimizer; ``forward`` returns the losses.

    - ``l1``: l1_weight x mean |G(grid) - image|;
    - ``perceptual``: perceptual_weight x mean L1 between the maps of a frozen CNN
      (``perceptual_net(images) -> [maps]``) on fake and real, the reference's perceptual loss;
    - ``d_hinge``: the discriminator's hinge loss, relu(1 - D(real)) + relu(1 + D(fake)), on a
      detached fake (it moves D only);
    - ``g_hinge``: gan_weight x -D(fake), and ``fm``: fm_weight x mean L1 between D's features
      of fake and real, both through a detached copy of D's weights (they move G only).
    """

    def __init__(
        self,
        generator: CentroidGridGenerator,
        params: GeneratorParams,
        perceptual_net: nn.Module | None = None,
    ):
        super().__init__()
        self.generator = generator
        self.l1_weight, self.gan_weight, self.fm_weight = (
            params.l1_weight,
            params.gan_weight,
            params.fm_weight,
        )
        self.perceptual_weight = params.perceptual_weight
        if params.gan_weight > 0:
            self.discriminator = PatchDiscriminator(tuple(params.disc_channels), generator.config.feat_dim)
        if params.perceptual_weight > 0:
            if perceptual_net is None:
                raise ValueError("perceptual_weight > 0 needs a perceptual_net")
            self.perceptual_net = perceptual_net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> GanPair:
        super().train(mode)
        if hasattr(self, "perceptual_net"):
            self.perceptual_net.eval()  # a fixed feature extractor, whatever the pair's mode
        return self

    def forward(self, images: torch.Tensor, grids: torch.Tensor) -> dict[str, torch.Tensor]:
        fake = self.generator(grids)  # (B, 3, S, S)
        losses: dict[str, torch.Tensor] = {}
        if self.l1_weight > 0:
            losses["l1"] = self.l1_weight * (fake - images).abs().mean()
        if self.perceptual_weight > 0:
            with torch.no_grad():
                real_maps = self.perceptual_net(images)
            fake_maps = self.perceptual_net(fake)
            dist = [(f - r).abs().mean() for f, r in zip(fake_maps, real_maps, strict=True)]
            losses["perceptual"] = self.perceptual_weight * torch.stack(dist).mean()
        if self.gan_weight > 0:
            losses.update(self._adversarial(images, fake, grids))
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses

    def _adversarial(
        self, images: torch.Tensor, fake: torch.Tensor, grids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        d = self.discriminator
        std = (grids - self.generator.centroid_mean) / self.generator.centroid_std  # (B, G, G, D)
        real_feats, real_logits = d(images, std)
        _, fake_logits = d(fake.detach(), std)
        out = {"d_hinge": F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()}
        frozen = {name: p.detach() for name, p in d.named_parameters()}
        g_feats, g_logits = functional_call(d, frozen, (fake, std))
        out["g_hinge"] = self.gan_weight * -g_logits.mean()
        if self.fm_weight > 0:
            fm = [(g - r.detach()).abs().mean() for g, r in zip(g_feats, real_feats, strict=True)]
            out["fm"] = self.fm_weight * torch.stack(fm).mean()
        return out


def build_generator(
    params: GeneratorParams, centroids: np.ndarray, *, grid: int, image_size: int
) -> CentroidGridGenerator:
    """A fresh generator for the (K, D) codebook and the world's image size (seed torch first)."""
    config = GeneratorConfig.from_params(
        params, grid=grid, feat_dim=int(centroids.shape[1]), image_size=image_size
    )
    return CentroidGridGenerator(config, *centroid_stats(centroids))


# ------------------------------------------------------------------------- save/load


def save_generator(model: CentroidGridGenerator, directory: str | Path) -> None:
    """config.json + model.safetensors, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(
            json.dumps(model.config.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})


def load_generator(directory: str | Path) -> CentroidGridGenerator:
    """Load a generator written by :func:`save_generator`, in eval mode; every key and shape checked."""
    from vlpipe.models.convert import load_state_dict_into, read_checkpoint

    directory = Path(directory)
    raw = read_json(directory / CONFIG_NAME)
    try:
        config = GeneratorConfig(**{**raw, "channels": tuple(raw["channels"])})
        config.check()
    except (TypeError, KeyError, ValueError) as e:
        raise InputError(directory / CONFIG_NAME, f"not a generator config: {e}") from e
    placeholder = torch.zeros(config.feat_dim)
    model = CentroidGridGenerator(config, placeholder, placeholder + 1)
    load_state_dict_into(model, read_checkpoint(directory), directory)
    return model.eval()


@torch.no_grad()
def generate(model: CentroidGridGenerator, grids: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """Images of (B, G, G, D) centroid grids as (B, S, S, 3) uint8 BGR, batch by batch."""
    out = []
    for start in range(0, len(grids), batch_size):
        img = model(grids[start : start + batch_size])  # (b, 3, S, S) in [-1, 1]
        out.append(((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), dtype=np.uint8)
