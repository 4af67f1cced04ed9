"""P2 weighting (Choi et al., 2022): λ'_t = λ_t / (k + SNR(t))^γ, applied to any ε-loss.

It down-weights the clean-up stage (high SNR) so training spends its capacity on content.
γ = 0 is uniform; the paper uses k = 1 and γ ∈ {0.5, 1}.

From Python: ``guidekit.train_ddpm(data, out, weighting="p2", weighting_options={"p2_gamma":
0.5})``, or :func:`p2_weights` for the table itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guidekit.errors import GuidekitError
from guidekit.hookspecs import hookimpl
from guidekit.options import Option
from guidekit.specs import WeightingSpec

if TYPE_CHECKING:  # torch loads on first use: `guidekit --help` must not import it
    import torch

    from guidekit.schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = ["p2_weights"]


def p2_weights(schedule: NoiseSchedule, p2_gamma: float, p2_k: float) -> torch.Tensor:
    """λ'_t = 1 / (k + SNR(t))^γ over the schedule's steps."""
    import torch

    if p2_k <= 0 and p2_gamma > 0:
        raise GuidekitError(f"--p2-k must be > 0, got {p2_k}")
    snr = schedule.float64["snr"]
    return (1.0 / (p2_k + snr) ** p2_gamma).to(torch.float32)


@hookimpl
def guidekit_weightings() -> list[WeightingSpec]:
    return [
        WeightingSpec(
            "p2",
            p2_weights,
            help="P2: λ_t / (k + SNR)^γ, favouring the content stage.",
            options=[
                Option("p2_gamma", float, 1.0, "γ of P2 (0 = uniform)."),
                Option("p2_k", float, 1.0, "k of P2."),
            ],
        )
    ]
