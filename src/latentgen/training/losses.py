"""Autoencoder losses: the PatchGAN discriminator (hinge loss, adaptive weight), LPIPS on VGG16 features when
weights are given, else the Laplacian-pyramid L1 loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .options import AEOptions


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. arXiv 1611.07004), as taming-transformers
    `taming/modules/discriminator/model.py` (BatchNorm, LeakyReLU 0.2, 4x4 convs; `main` Sequential)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            seq += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*seq)
        self.apply(_init_discriminator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_discriminator(m: nn.Module) -> None:
    """taming `weights_init`: conv N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye arXiv 1705.02894): ½(E[relu(1 - D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class HingeLoss(nn.Module):
    """The discriminator's hinge loss on real and reconstructed images in one forward pass, so that one
    DistributedDataParallel call covers both discriminator calls (taming calls it twice, separately: each batch
    keeps its own BatchNorm statistics)."""

    def __init__(self, disc: nn.Module):
        super().__init__()
        self.disc = disc

    def forward(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        return hinge_d_loss(self.disc(x), self.disc(rec))


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: nn.Parameter) -> torch.Tensor:
    """λ = ||∇_L L_rec|| / (||∇_L L_GAN|| + 1e-4), clamped to [0, 1e4] (Esser et al. 2012.09841, Eq. 7)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device)
    k = (k[:, None] * k[None, :]) / k.sum() ** 2
    c = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(c, 1, 5, 5), groups=c)


class LaplacianPyramidLoss(nn.Module):
    """Lap1 (Bojanowski et al. arXiv 1707.05776, Eq. 3): Σ_j 2^{2j}·|L^j(x) - L^j(x̂)|₁ over a Laplacian
    pyramid with a 5x5 binomial kernel, here as the per-level mean (the same weighting up to a constant).
    A perceptual substitute that needs no pretrained network. Returns one value per image, [B, 1, 1, 1]."""

    name = "laplacian-pyramid-l1"

    def __init__(self, levels: int = 4):
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(x.shape[0])
        d = x - y
        for _ in range(self.levels):
            if min(d.shape[-2:]) < 4:
                break
            low = _blur(d)
            total = total + (d - low).abs().mean(dim=(1, 2, 3))
            d = low[..., ::2, ::2]
        total = total + d.abs().mean(dim=(1, 2, 3))
        return total[:, None, None, None]


LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision indices)


class VGG16Features(nn.Module):
    """torchvision `vgg16().features` up to relu5_3 (Simonyan & Zisserman arXiv 1409.1556), with its key names
    (`features.N.weight`) so a torchvision state dict loads directly."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                taps.append(x)
        return taps


class NetLinLayer(nn.Module):
    """LPIPS `NetLinLayer`: `model = [Dropout, 1x1 conv without bias]` (key `linK.model.1.weight`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. arXiv 1801.03924, Eq. 1): Σ_l mean_hw ||w_l ⊙ (ŷ_l - ŷ'_l)||² over unit-normalised
    VGG16 activations, after LPIPS' ScalingLayer. Without learned heads w_l = 1 (lpips=False).
    Returns [B, 1, 1, 1]."""

    name = "lpips-vgg16"

    def __init__(self):
        super().__init__()
        self.net = VGG16Features()
        for i, c in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{i}", NetLinLayer(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        self.heads = "uniform"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.net((x - self.shift) / self.scale), self.net((y - self.shift) / self.scale)
        total = 0
        for i, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}").model[1]((a - b) ** 2).mean(dim=(2, 3), keepdim=True)
        return total


def load_lpips(path: str) -> LPIPS:
    """LPIPS from a safetensors file with torchvision VGG16 `features.N.*` (classifier.* ignored) and, when
    present, LPIPS' heads `lin{0..4}.model.1.weight`; otherwise uniform channel weights."""
    from ..loading.layout import load_strict
    from ..loading.safetensors import read_safetensors

    tensors, _ = read_safetensors(path)
    lp = LPIPS()
    feats = {k: v for k, v in tensors.items() if k.startswith("features.")}
    if not feats:
        raise CheckpointError(f"--lpips-vgg {path}: no features.N.weight keys (torchvision VGG16 layout expected)")
    load_strict(lp.net, feats, what="VGG16 features", source=path)
    heads = {k: v for k, v in tensors.items() if k.startswith("lin")}
    if heads:
        load_strict(
            nn.ModuleDict({f"lin{i}": getattr(lp, f"lin{i}") for i in range(5)}),
            heads,
            what="LPIPS linear heads",
            source=path,
        )
        lp.heads = "lpips"
    else:
        with torch.no_grad():
            for i in range(5):
                getattr(lp, f"lin{i}").model[1].weight.fill_(1.0)
    return lp.eval().requires_grad_(False)


def perceptual_loss(opts: AEOptions) -> nn.Module:
    return load_lpips(opts.lpips_vgg) if opts.lpips_vgg else LaplacianPyramidLoss()


def perceptual_name(p: nn.Module) -> str:
    return f"{p.name} ({p.heads} heads)" if isinstance(p, LPIPS) else p.name


VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
