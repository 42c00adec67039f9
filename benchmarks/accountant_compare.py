"""RDP vs PLD for a config's privacy plan: epsilon of the same releases, calibrated noise,
and the smallest budgets that calibrate.

    python benchmarks/accountant_compare.py [configs/dp_rotated_mnist.toml]

Prints the ``auto`` choice with its reason, the plan calibrated under each accountant (noise
multipliers; epsilon of that plan under both), then DP-SGD noise for small budgets.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from privacy.accounting import PrivacyBudget, format_down, format_up, plan_epsilon  # noqa: E402
from secure_fedora.core.config import ConfigError, load_config  # noqa: E402
from secure_fedora.secure.private import choose_accountant, client_budget, privacy_plan  # noqa: E402

SMALL_BUDGETS = (0.3, 0.1, 0.05, 0.02)


def main(path: str) -> None:
    """Print the comparison for the config at ``path`` (method ``fedora``, client 0's budget)."""
    warnings.simplefilter("ignore")  # Opacus's alpha-grid-edge warnings while probing sigmas
    cfg = load_config(path)
    budget = client_budget(cfg, 0)
    choice = choose_accountant(cfg, "fedora", [budget])
    print(f"auto -> {choice.name}: {choice.reason}")
    for name in ("rdp", "pld"):
        plan = privacy_plan(cfg, "fedora", budget, name)
        eps = {a: plan_epsilon(plan.releases, budget.delta, plan.dpsgd_noise, a)
               for a in ("rdp", "pld")}
        print(f"calibrated under {name}: dpsgd sigma {plan.dpsgd_noise!r}, summary"
              f" {plan.summary_noise!r}, lambda {plan.lambda_noise!r}; epsilon rdp"
              f" {format_up(eps['rdp'], 4)}, pld {format_up(eps['pld'], 4)}")
    for eps_budget in SMALL_BUDGETS:
        row = []
        for name in ("rdp", "pld"):
            try:
                plan = privacy_plan(cfg, "fedora", PrivacyBudget(eps_budget, budget.delta), name)
                row.append(f"{name} sigma {format_down(plan.dpsgd_noise, 2)}")
            except ConfigError as err:
                row.append(f"{name} cannot calibrate ({err})")
        print(f"epsilon {eps_budget:g}: " + ", ".join(row))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "configs" / "dp_rotated_mnist.toml"))
