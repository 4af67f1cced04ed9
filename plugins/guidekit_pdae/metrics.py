"""Reconstruction metrics: SSIM, MSE and LPIPS (AlexNet, v0.1), in plain torch.

Every metric takes two batches of images in [0, 1], (N, C, H, W), and returns one value per
image, (N,). LPIPS needs two weight files the user downloads once (torchvision is not a
dependency and is never imported): torchvision's AlexNet ImageNet weights and LPIPS v0.1's
linear heads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guidekit import GuidekitError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. (2004), data range L = 1

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
LINEAR_FILE = "alex.pth"
LINEAR_URL = ("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/"
              "v0.1/alex.pth")
LPIPS_MIN_SIZE = 64  # AlexNet's stride-4 11x11 first layer needs room
# torchvision AlexNet ``features`` indices of the five convolutions and their shapes
ALEX_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1),
              (8, 384, 256, 3, 1, 1), (10, 256, 256, 3, 1, 1))
LPIPS_CHANNELS = tuple(c[2] for c in ALEX_CONVS)
# LPIPS v0.1 input scaling (ImageNet statistics on the [−1, 1] scale)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def _check_pair(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise GuidekitError(f"{what} needs two (N, C, H, W) batches of one shape, got "
                            f"{tuple(a.shape)} and {tuple(b.shape)}")


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per image, (N,), of images in [0, 1]."""
    _check_pair(a, b, "mse")
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).float()


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """The separable 1-D Gaussian of SSIM, normalised to sum 1, (size,) float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """SSIM per image, (N,), of images in [0, 1] (Wang et al. 2004).

    Gaussian window 11, σ 1.5, C1 = (0.01)², C2 = (0.03)², local statistics over the valid
    region only (no padding), averaged over pixels and channels. Images smaller than 11 px use
    a window the size of the image.
    """
    _check_pair(a, b, "ssim")
    n, c, h, w = a.shape
    size = min(SSIM_WINDOW, h, w)
    g = gaussian_window(size).to(a.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size)
    c1, c2 = SSIM_K1**2, SSIM_K2**2

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, kernel, groups=c)

    x, y = a.double(), b.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


# --------------------------------------------------------------------------- LPIPS


def _load_state(path: Path | None, name: str, url: str, flag: str) -> dict[str, Tensor]:
    if path is None or not Path(path).is_file():
        where = "not given" if path is None else f"not found at {path}"
        raise GuidekitError(f"LPIPS needs {name} ({where}): download it from {url} and pass "
                            f"{flag} FILE")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding more than tensors
        raise GuidekitError(f"{path} is not a torch weight file ({type(exc).__name__}); "
                            f"{flag} takes {name} from {url}") from None
    if not isinstance(state, dict):
        raise GuidekitError(f"{path} holds no state dict; {flag} takes {name} from {url}")
    return state


def _take(state: dict[str, Tensor], key: str, shape: tuple[int, ...], path: Path) -> Tensor:
    v = state.get(key)
    if not isinstance(v, Tensor) or tuple(v.shape) != shape:
        got = tuple(v.shape) if isinstance(v, Tensor) else "missing"
        raise GuidekitError(f"{path} is not the expected weight file: '{key}' should be "
                            f"{shape}, got {got}")
    return v.float()


class LPIPS(nn.Module):
    """LPIPS v0.1 on AlexNet: Σ_l mean_hw ‖w_l ⊙ (f̂_l(a) − f̂_l(b))‖², f̂ the channel-unit-
    normalised ReLU outputs of AlexNet's five convolutions. Use :func:`load_lpips`."""

    def __init__(self, convs: list[nn.Conv2d], heads: list[Tensor]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.heads = nn.ParameterList([nn.Parameter(h, requires_grad=False) for h in heads])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def features(self, x: Tensor) -> list[Tensor]:
        """relu1..relu5 of AlexNet for images already scaled; max-pools before conv2, conv3."""
        out = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(conv(x))
            out.append(x)
        return out

    def _prepare(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:  # grayscale: the same image on every channel
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise GuidekitError(f"LPIPS takes 1- or 3-channel images, got {x.shape[1]}")
        h, w = x.shape[-2:]
        if min(h, w) < LPIPS_MIN_SIZE:
            f = LPIPS_MIN_SIZE / min(h, w)
            x = F.interpolate(x, size=(round(h * f), round(w * f)), mode="bilinear",
                              align_corners=False)
        return ((x * 2 - 1) - self.shift) / self.scale

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS distance per image, (N,), of images in [0, 1]."""
        _check_pair(a, b, "lpips")
        dev = self.shift.device
        fa = self.features(self._prepare(a.float().to(dev)))
        fb = self.features(self._prepare(b.float().to(dev)))
        total = torch.zeros(a.shape[0], device=dev)
        for x, y, head in zip(fa, fb, self.heads, strict=True):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + F.conv2d((x - y) ** 2, head).mean((1, 2, 3))
        return total.cpu()


def load_lpips(
    alexnet: str | Path | None, linear: str | Path | None, device: str | torch.device = "cpu"
) -> LPIPS:
    """Build LPIPS from torchvision's ``alexnet-owt-7be5be79.pth`` and LPIPS v0.1's
    ``alex.pth``; a missing or wrong file is a one-line error naming it and its source."""
    alex_path = None if alexnet is None else Path(alexnet)
    lin_path = None if linear is None else Path(linear)
    alex = _load_state(alex_path, f"torchvision's AlexNet ImageNet weights {ALEXNET_FILE}",
                       ALEXNET_URL, "--lpips-alexnet")
    lin = _load_state(lin_path, f"LPIPS v0.1's linear heads {LINEAR_FILE}", LINEAR_URL,
                      "--lpips-linear")
    assert alex_path is not None and lin_path is not None
    convs = []
    for idx, c_in, c_out, k, stride, pad in ALEX_CONVS:
        conv = nn.Conv2d(c_in, c_out, k, stride, pad)
        conv.weight.data = _take(alex, f"features.{idx}.weight", (c_out, c_in, k, k), alex_path)
        conv.bias.data = _take(alex, f"features.{idx}.bias", (c_out,), alex_path)
        convs.append(conv)
    heads = []
    for i, ch in enumerate(LPIPS_CHANNELS):
        # lin{i}.model is Sequential(Dropout, Conv2d) in the release; without dropout it is 0
        key = next((k for k in (f"lin{i}.model.1.weight", f"lin{i}.model.0.weight") if k in lin),
                   f"lin{i}.model.1.weight")
        heads.append(_take(lin, key, (1, ch, 1, 1), lin_path))
    return LPIPS(convs, heads).to(device)
