"""What a DP-SGD client's noise buys: its (epsilon, delta) by Opacus's RDP accountant (optional package)."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

from ..common.checks import whole_number
from ..common.errors import RConvError
from ..common.optional import missing

# The pin of requirements-federated.txt, named in the install hint.
OPACUS_PIN = "opacus==1.6.0"
_INSTALL_HINT = (f"the privacy budget needs the optional opacus package, which is not installed here: pip install -r "
                 f"requirements-federated.txt in the repository's root (or pip install \"{OPACUS_PIN}\")")


class PrivacyBudget(NamedTuple):
    """(epsilon, delta)-differential privacy of a DP-SGD run, and the Renyi order that gave the tightest epsilon."""

    epsilon: float
    delta: float
    order: float


def opacus_missing():
    """Why privacy_budget cannot run here, in one sentence naming the install command; "" when it can."""
    return missing(_accountant)


def _accountant():
    """Opacus's RDP analysis and the Renyi orders its accountant tries."""
    try:
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return rdp, list(RDPAccountant.DEFAULT_ALPHAS)


def _positive(value, name, *, most=math.inf, what="a finite number > 0"):
    """A finite real number (bools refused) in (0, most], or an RConvError naming it."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value <= most:
        raise RConvError(f"privacy_budget: {name} must be {what}; got {value!r}")
    return float(value)


def privacy_budget(noise_multiplier, sample_rate, steps, *, delta=1e-5) -> PrivacyBudget:
    """The (epsilon, delta) a DP-SGD client spends, by Opacus's RDP accountant.

    Args:
        noise_multiplier: the Gaussian noise's standard deviation over the clipping norm (> 0; at 0
            there is no privacy, and the accountant's epsilon is infinite).
        sample_rate: a mini-batch's share of the client's data (0 < q <= 1; 1 for full-batch steps).
        steps: how many noisy steps the client took (over all rounds it took part in).
        delta: the probability outside the epsilon guarantee (0 < delta < 1; below 1 / dataset size).
    Needs the optional opacus package (opacus_missing() says why not, and how to install it).
    """
    noise = _positive(noise_multiplier, "noise_multiplier")
    rate = _positive(sample_rate, "sample_rate", most=1.0, what="a number in (0, 1]")
    count = whole_number(steps, "privacy_budget: steps")
    chance = _positive(delta, "delta", most=1.0, what="a number in (0, 1)")
    if chance == 1.0:
        raise RConvError("privacy_budget: delta must be a number in (0, 1); delta = 1 promises nothing")
    analysis, orders = _accountant()
    divergences = analysis.compute_rdp(q=rate, noise_multiplier=noise, steps=count, orders=orders)
    epsilon, order = analysis.get_privacy_spent(orders=orders, rdp=divergences, delta=chance)
    return PrivacyBudget(float(epsilon), chance, float(order))
