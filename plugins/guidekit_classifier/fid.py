"""Real FID: the Fréchet distance in the pool features (2048-D) of the TensorFlow FID
Inception network, through torch-fidelity (``pip install 'guidekit[fid]'``).

Nothing downloads at run time: the weights are a local file the user supplies,
:data:`INCEPTION_WEIGHTS_FILE` from torch-fidelity's release (:data:`INCEPTION_WEIGHTS_URL`).
torch-fidelity imports torchvision, which must be the build made for the installed torch
(PyPI's default torchvision wheel does not load beside a CPU-only torch). When either is
missing, the weights file included, the error is one line that says what to install or
supply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from guidekit.distributed import resolve_device
from guidekit.errors import GuidekitError

from .quality import frechet_distance

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "inception_features",
    "inception_fid",
    "load_inception",
]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)
FEATURES = "2048"  # the pool layer FID is defined on
_BATCH = 50

_GET_WEIGHTS = (f"download {INCEPTION_WEIGHTS_FILE} once (torch-fidelity's v0.2.0 release: "
                f"{INCEPTION_WEIGHTS_URL}) and give its path with --fid-weights; nothing is "
                "downloaded at run time")


def _extractor_class() -> Any:
    """torch-fidelity's Inception class, or a one-line error naming what to install."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as exc:  # ImportError, or torchvision's RuntimeError on a mismatched torch
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise GuidekitError(
            f"real FID needs torch-fidelity and a torchvision built for torch "
            f"{torch.__version__} ({reason}): pip install 'guidekit[fid]' with the torchvision "
            "matching your torch (a CPU torch: from PyTorch's CPU wheel index), or leave out "
            "--fid-weights"
        ) from None
    return FeatureExtractorInceptionV3


def _check_weights(weights: str | Path | None) -> Path:
    """The weights file as a path, checked to be a plain state dict of tensors (loaded with
    ``weights_only``, so a hostile pickle never runs) before torch-fidelity loads it."""
    if weights is None:
        raise GuidekitError(f"real FID needs the Inception weights: {_GET_WEIGHTS}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise GuidekitError(f"no Inception weights file at {path}: {_GET_WEIGHTS}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise GuidekitError(f"{path} is not a PyTorch weights file ({reason}): "
                            f"{_GET_WEIGHTS}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise GuidekitError(f"{path} holds no state dict of tensors: {_GET_WEIGHTS}")
    return path


def load_inception(weights: str | Path | None, device: str | torch.device = "cpu") -> nn.Module:
    """torch-fidelity's FID Inception with the weights file ``weights``, frozen, on
    ``device``; one-line errors when torch-fidelity (or a matching torchvision) is missing or
    the weights are missing or are not the Inception's."""
    cls = _extractor_class()
    path = _check_weights(weights)
    try:
        model = cls("inception-v3-compat", [FEATURES], feature_extractor_weights_path=str(path))
    except Exception as exc:  # a state dict of other keys or shapes
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise GuidekitError(f"{path} does not fit the FID Inception ({reason}): "
                            f"{_GET_WEIGHTS}") from None
    return model.to(resolve_device(device)).eval()


def _to_uint8_rgb(x: Tensor) -> Tensor:
    """Images in [−1, 1] as the 8-bit RGB the Inception takes (grey repeated 3 times)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise GuidekitError(f"real FID takes (N, 1 or 3, H, W) images, got {tuple(x.shape)}")
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def inception_features(model: nn.Module, x: Tensor, batch_size: int = _BATCH) -> Tensor:
    """The (N, 2048) float64 pool features of images ``x`` in [−1, 1] (quantised to 8 bits;
    torch-fidelity resizes them to 299 px as TensorFlow did)."""
    device = next(model.parameters()).device
    x = _to_uint8_rgb(x)
    out = []
    for i in range(0, x.shape[0], batch_size):
        (feats,) = model(x[i : i + batch_size].to(device))
        out.append(feats.double().cpu())
    return torch.cat(out) if out else torch.empty(0, 2048, dtype=torch.float64)


def inception_fid(
    real: Tensor, fake: Tensor, weights: str | Path | nn.Module | None,
    device: str | torch.device = "cpu",
) -> float:
    """FID of images ``fake`` against ``real`` (both (N, C, H, W) in [−1, 1]): the
    :func:`~guidekit_classifier.quality.frechet_distance` of their Inception pool features.
    ``weights``: the path of :data:`INCEPTION_WEIGHTS_FILE`, or a model from
    :func:`load_inception`."""
    model = weights if isinstance(weights, nn.Module) else load_inception(weights, device)
    return frechet_distance(inception_features(model, real), inception_features(model, fake))
