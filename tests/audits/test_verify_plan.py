"""`audit verify` recomputes the planned epsilons results.json states (``privacy.<method>.plan``)
and holds the plan to every budget the ledgers and results.json state, on a real tiny DP run
with a per-client override (two budgets)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from audits.verify import verify_run

from .conftest import copy_run, keystore_of, reanchor

METHODS = ("fedora", "local")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished in-process DP run of FEDORA and Local, 3 clients, client 2 at epsilon 3.0
    (``[privacy.overrides."2"]``), the others at 8.0; the accountant chosen by ``"auto"``."""
    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.inprocess import Simulation

    cfg = parse_config(
        {
            "name": "plan-eps",
            "methods": list(METHODS),
            "data": {
                "num_clients": 3,
                "train_per_client": 16,
                "val_per_client": 8,
                "test_per_client": 8,
                "validation": "private",
            },
            "training": {"rounds": 1, "local_epochs": 1, "batch_size": 8},
            "fedora": {"relatedness": "noised", "k": 1},
            "privacy": {"enabled": True, "epsilon": 8.0, "overrides": {"2": {"epsilon": 3.0}}},
        }
    )
    run = tmp_path_factory.mktemp("plan") / "run"
    Simulation(cfg, run, keystore=keystore_of(run)).run()
    return run


@pytest.fixture()
def run(real_run: Path, tmp_path: Path) -> Path:
    return copy_run(real_run, tmp_path / "run")


def _edit(run: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Apply ``edit`` to results.json's privacy section and re-sign the anchor (as whoever
    writes results.json and holds the operator key can)."""
    doc = json.loads((run / "results.json").read_text())
    edit(doc["privacy"])
    (run / "results.json").write_text(json.dumps(doc, indent=2))
    reanchor(run)


def _found(run: Path, check: str, strict: bool = False) -> list:  # type: ignore[type-arg]
    return [f for f in verify_run(run, strict=strict).findings if f.check == check]


def _row(privacy: dict[str, Any], method: str, epsilon: float) -> dict[str, Any]:
    (row,) = [r for r in privacy[method]["plan"] if r["epsilon_budget"] == epsilon]
    return row


def test_the_plan_rows_of_a_real_run_recompute_and_cover_every_budget(real_run: Path) -> None:
    """Each method states one plan row per budget (8.0 for two clients, 3.0 for client 2)
    with both candidates' planned epsilons; verify recomputes them and finds nothing."""
    privacy = json.loads((real_run / "results.json").read_text())["privacy"]
    for method in METHODS:
        assert sorted((r["epsilon_budget"], r["clients"]) for r in privacy[method]["plan"]) == [
            (3.0, 1),
            (8.0, 2),
        ]
        for row in privacy[method]["plan"]:
            assert row["planned_epsilon"] == row[f"planned_epsilon_{row['accountant']}"]
    report = verify_run(real_run)
    assert report.ok, report.errors
    assert not [f for f in report.findings if f.check in ("plan_epsilon", "plan_coverage")]


def _scale(key: str, factor: float) -> Callable[[dict[str, Any]], None]:
    def edit(row: dict[str, Any]) -> None:
        row[key] = row[key] * factor

    return edit


def _more_lambda_noise(row: dict[str, Any]) -> None:
    # four times the lambda noise its release line states: the stated epsilons stay
    k = next(i for i, line in enumerate(row["releases"]) if line.startswith("gaussian_lambda"))
    head, sigma = row["releases"][k].rstrip(")").split(", sigma=")
    row["releases"][k] = f"{head}, sigma={float(sigma) * 4!r})"


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (_scale("planned_epsilon_pld", 0.9), "planned_epsilon_pld is"),
        (_scale("planned_epsilon_rdp", 1.1), "planned_epsilon_rdp is"),
        # the stated epsilon and the chosen accountant's key lowered together: PLD recomputes
        (
            lambda row: row.update(
                planned_epsilon=row["planned_epsilon"] * 0.8,
                planned_epsilon_pld=row["planned_epsilon"] * 0.8,
            ),
            "planned_epsilon_pld is",
        ),
        # the stated epsilon alone: it is not the chosen accountant's value
        (lambda row: row.update(planned_epsilon=row["planned_epsilon_rdp"]), "planned_epsilon is"),
        (_more_lambda_noise, "its releases compose to epsilon"),
        (lambda row: row["releases"].__setitem__(0, "dpsgd x0 (q=0.5)"), "releases[0] (dpsgd"),
        (lambda row: row.update(delta=2.0), "delta must be in (0, 1)"),
    ],
)
def test_a_tampered_plan_row_is_an_error_naming_method_row_and_key(
    run: Path, edit: Callable[[dict[str, Any]], Any], named: str
) -> None:
    _edit(run, lambda privacy: edit(_row(privacy, "fedora", 3.0)))
    index = next(
        i
        for i, r in enumerate(
            json.loads((run / "results.json").read_text())["privacy"]["fedora"]["plan"]
        )
        if r["epsilon_budget"] == 3.0
    )
    found = _found(run, "plan_epsilon")
    assert found and {(f.severity, f.method) for f in found} == {("error", "fedora")}, found
    assert all(f.message.startswith(f"plan[{index}] (epsilon 3.0, delta ") for f in found)
    assert any(named in f.message for f in found), found


def test_a_prv_plan_row_is_held_to_the_pessimistic_pld(run: Path) -> None:
    """dp_accounting has no PRV: a row naming it has its planned_epsilon held to the
    pessimistic PLD from below (PRV's bound may add its discretization error above it)."""

    def prv(privacy: dict[str, Any], factor: float) -> None:
        # the method ran under PRV: its section and every plan row name it
        privacy["local"]["accountant"] = "prv"
        for other in privacy["local"]["plan"]:
            other["accountant"] = "prv"
        # the 3.0 row: more noise than the 8.0 row's, so its finer PLD rechecks cost a third
        row = _row(privacy, "local", 3.0)
        row.update(planned_epsilon=row["planned_epsilon_pld"] * factor)

    for factor in (1.0, 1.2):
        _edit(run, lambda privacy, factor=factor: prv(privacy, factor))
        assert _found(run, "plan_epsilon") == []
    _edit(run, lambda privacy: prv(privacy, 0.9))
    (found,) = _found(run, "plan_epsilon")
    assert found.severity == "error" and found.method == "local"
    assert "planned_epsilon is" in found.message and "(PLD, dp_accounting)" in found.message
    assert "(its accountant: 'prv')" in found.message


def test_a_budget_without_a_plan_row_names_its_client(run: Path) -> None:
    """Client 2's budget (the override) removed from the plan, and from the accountant
    comparison: each table that leaves it out is an error naming client-002."""

    def drop_plan(privacy: dict[str, Any]) -> None:
        privacy["local"]["plan"] = [
            r for r in privacy["local"]["plan"] if r["epsilon_budget"] != 3.0
        ]

    _edit(run, drop_plan)
    (found,) = _found(run, "plan_coverage")
    assert (found.severity, found.method, found.client_id) == ("error", "local", "client-002")
    assert found.ledger == "ledgers/local/client-002.jsonl"
    assert "results.json's privacy.local.plan" in found.message
    assert "(epsilon 3.0, delta 1e-05; its ledger records it)" in found.message

    def drop_choice(privacy: dict[str, Any]) -> None:
        comparison = privacy["fedora"]["accountant_choice"]["comparison"]
        comparison[:] = [r for r in comparison if r["epsilon_budget"] != 3.0]

    _edit(run, drop_choice)
    found = _found(run, "plan_coverage")
    assert {
        (f.method, f.client_id, f.message.split("results.json's ")[1].split(" ")[0]) for f in found
    } == {
        ("local", "client-002", "privacy.local.plan"),
        ("fedora", "client-002", "accountant_choice.comparison"),
    }


def test_a_client_row_stating_another_budget_must_be_covered_too(run: Path) -> None:
    """results.json's client row states a budget the ledger does not: that budget too must
    have a plan row and a comparison row."""

    def other(privacy: dict[str, Any]) -> None:
        privacy["local"]["clients"][0]["epsilon_budget"] = 5.0

    _edit(run, other)
    found = _found(run, "plan_coverage")
    assert len(found) == 2 and {(f.method, f.client_id) for f in found} == {("local", "client-000")}
    assert all(
        "(epsilon 5.0, delta 1e-05; results.json's client row states it)" in f.message
        for f in found
    )


def test_plan_rows_written_before_they_stated_their_epsilons_still_verify_unchecked(
    run: Path,
) -> None:
    """Rows of an older results.json (no planned_epsilon_rdp/_pld, no accountant) cannot be
    recomputed: one unchecked warning per method, an error under strict; the run verifies."""

    def older(privacy: dict[str, Any]) -> None:
        for method in METHODS:
            for row in privacy[method]["plan"]:
                for key in ("planned_epsilon_rdp", "planned_epsilon_pld", "accountant"):
                    del row[key]

    _edit(run, older)
    report = verify_run(run)
    assert report.ok, report.errors
    found = [f for f in report.findings if f.check == "plan_epsilon"]
    assert sorted(f.method for f in found) == list(METHODS)
    assert all(f.severity == "warning" and f.unchecked for f in found)
    assert (
        "plan row(s) 0, 1 state no accountant, planned_epsilon_pld, planned_epsilon_rdp"
        in found[0].message
    )
    assert any(f.check == "plan_epsilon" for f in verify_run(run, strict=True).errors)


def test_plan_and_budget_fields_of_the_wrong_type_are_named_not_a_crash(run: Path) -> None:
    """A plan row whose budget or releases are no numbers or list, and a client row whose
    budget is a list, give findings (the plan row's error, the uncovered budget), not a
    TypeError from the comparison."""

    def broken(privacy: dict[str, Any]) -> None:
        row = _row(privacy, "local", 3.0)
        row.update(epsilon_budget=[3.0], releases="dpsgd x2 (q=0.5)")
        privacy["local"]["clients"][0]["epsilon_budget"] = [8.0]

    _edit(run, broken)
    report = verify_run(run)
    found = [f for f in report.findings if f.check in ("plan_epsilon", "plan_coverage")]
    assert {(f.check, f.client_id) for f in found} == {
        ("plan_epsilon", None),
        ("plan_coverage", "client-002"),
    }
    assert "releases must be a non-empty list of release lines" in found[0].message


@pytest.mark.parametrize(("key", "value"), [("epsilon_budget", 5.0), ("delta", 2e-5)])
def test_a_client_row_stating_another_budget_than_its_ledger_is_an_error(
    run: Path, key: str, value: float
) -> None:
    """results.json's client row of client-000 (Local) states a budget its ledger does not
    record: an error naming the client, the key and both values."""
    _edit(run, lambda privacy: privacy["local"]["clients"][0].update({key: value}))
    (found,) = _found(run, "results_budget")
    assert (found.severity, found.method, found.client_id) == ("error", "local", "client-000")
    assert found.ledger == "ledgers/local/client-000.jsonl"
    ledger_key, recorded = {"epsilon_budget": ("budget_epsilon", 8.0), "delta": ("delta", 1e-5)}[
        key
    ]
    assert (
        f"client row of client-000 states {key} {value!r}, its ledger records"
        f" {ledger_key} {recorded!r}" in found.message
    )


def test_the_client_rows_of_a_real_run_state_their_ledgers_budgets(real_run: Path) -> None:
    assert _found(real_run, "results_budget") == []


@pytest.mark.parametrize("clients", [3, 1, 0, "2", -1])
def test_a_plan_row_counting_other_clients_than_hold_its_budget_is_an_error(
    run: Path, clients: Any
) -> None:
    """The 8.0 row of FEDORA's plan states a clients count that is not the two clients
    (client-000, client-001) holding that budget, or no count at all."""
    _edit(run, lambda privacy: _row(privacy, "fedora", 8.0).update(clients=clients))
    (found,) = _found(run, "plan_coverage")
    assert (found.severity, found.method, found.client_id) == ("error", "fedora", None)
    assert found.message.startswith("privacy.fedora.plan[")
    if isinstance(clients, int) and clients >= 0:
        assert (
            f"(epsilon 8.0, delta 1e-05) states {clients} client(s), but 2 hold that budget"
            " (client-000, client-001)" in found.message
        )
    else:
        assert f"states clients {clients!r}: it must be a non-negative integer" in found.message


def test_one_budgets_clients_split_over_two_plan_rows_add_up(run: Path) -> None:
    """A runtime may state one budget's clients in two rows (Flower: by PRV refinement):
    their counts are added; one more row for the budget is then a miscount."""

    def split(privacy: dict[str, Any]) -> None:
        row = _row(privacy, "fedora", 8.0)
        row["clients"] = 1
        privacy["fedora"]["plan"].append({**row, "clients": 1})

    _edit(run, split)
    assert _found(run, "plan_coverage") == []
    _edit(run, lambda privacy: privacy["fedora"]["plan"][-1].update(clients=2))
    (found,) = _found(run, "plan_coverage")
    assert "(epsilon 8.0, delta 1e-05) state 3 client(s), but 2 hold that budget" in found.message


def test_a_plan_row_stating_no_clients_count_is_an_error(run: Path) -> None:
    """Every runtime's plan rows have stated ``clients`` since plans were written: a row
    without it cannot be counted, so it is one error naming the row (not a silently smaller
    sum, nor a second miscount error for the budget it shares with another row)."""
    _edit(run, lambda privacy: _row(privacy, "fedora", 8.0).pop("clients"))
    report = verify_run(run)
    (found,) = [f for f in report.findings if f.check == "plan_coverage"]
    assert (found.severity, found.method, found.client_id) == ("error", "fedora", None)
    assert found.message.startswith("privacy.fedora.plan[")
    assert "(epsilon 8.0, delta 1e-05) states no clients" in found.message
    assert not report.ok

    def split(privacy: dict[str, Any]) -> None:  # one budget over two rows, one uncounted
        row = _row(privacy, "local", 3.0)
        privacy["local"]["plan"].append({k: v for k, v in row.items() if k != "clients"})

    _edit(run, split)
    found = [f for f in _found(run, "plan_coverage") if f.method == "local"]
    assert len(found) == 1 and "(epsilon 3.0, delta 1e-05) states no clients" in found[0].message


def test_a_plan_row_naming_another_accountant_than_its_method_is_an_error(run: Path) -> None:
    """The 3.0 row of Local's plan names the other candidate (its planned_epsilon that
    candidate's, so the row is consistent in itself): the method ran under another."""
    privacy = json.loads((run / "results.json").read_text())["privacy"]
    ran = privacy["local"]["accountant"]
    other = "rdp" if ran == "pld" else "pld"

    def switch(privacy: dict[str, Any]) -> None:
        row = _row(privacy, "local", 3.0)
        row.update(accountant=other, planned_epsilon=row[f"planned_epsilon_{other}"])

    _edit(run, switch)
    (found,) = _found(run, "plan_epsilon")
    assert (found.severity, found.method) == ("error", "local")
    assert (
        f"accountant is {other!r}, but results.json's privacy.local states accountant {ran!r}"
        in found.message
    )


def test_a_privacy_section_without_a_plan_verifies_unchecked(run: Path) -> None:
    """A DP method's plan deleted from results.json: its checks cannot be made; an unchecked
    warning names the method (an error under strict), and the run still verifies."""
    _edit(run, lambda privacy: privacy["local"].pop("plan"))
    report = verify_run(run)
    assert report.ok, report.errors
    (found,) = [f for f in report.findings if f.check in ("plan_coverage", "plan_epsilon")]
    assert (found.severity, found.check, found.method, found.unchecked) == (
        "warning",
        "plan_coverage",
        "local",
        True,
    )
    assert "results.json's privacy.local states no plan" in found.message
    strict = verify_run(run, strict=True)
    assert [f.method for f in strict.errors if f.check == "plan_coverage"] == ["local"]
