"""results.json's derived entries come from the methods' declarations (no method name in the
runtime), at the same paths and with the same values as before."""

from __future__ import annotations

from typing import Any

import pytest

from secure_fedora.algorithms.methods import Local
from secure_fedora.core.config import parse_config
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.inprocess import summarize
from secure_fedora.runtimes.results import build_results, method_entry


def _entry(name: str, per_client: list[float], extra: dict | None = None) -> dict[str, Any]:
    selected = {**summarize(per_client), "round": 2}
    return method_entry(name, selected, summarize(per_client), 2, 0.0, 0.0, extra)


def _config(methods: list[str], dp: bool = False) -> Any:
    doc: dict[str, Any] = {"methods": methods, "data": {"num_clients": 3, "train_per_client": 40}}
    if dp:
        doc["privacy"] = {"enabled": True, "epsilon": 5.0, "delta": 1e-3}
        doc["fedora"] = {"relatedness": "noised"}
    return parse_config(doc)


def _build(cfg: Any, outcomes: dict) -> dict[str, Any]:
    return build_results(cfg, runtime="inprocess", config_hash="h", metric="accuracy",
                         outcomes=outcomes, privacy=None, clients=[])


def test_fedavg_ft_row_and_fedora_below_local_keep_their_paths_and_values() -> None:
    tuned = [0.7, 0.8, 0.9]
    outcomes = {
        "fedora": _entry("fedora", [0.6, 0.9, 0.5]),
        "local": _entry("local", [0.7, 0.8, 0.5]),
        "fedavg": _entry("fedavg", [0.4, 0.4, 0.4], {"finetuned_test_accuracy": tuned}),
    }
    doc = _build(_config(["fedora", "local", "fedavg"]), outcomes)
    assert list(doc["methods"]) == ["fedora", "local", "fedavg", "fedavg_ft"]
    assert doc["methods"]["fedavg_ft"] == {"name": "fedavg_ft",
                                           "selected": {**summarize(tuned), "round": 2},
                                           "metric": "accuracy"}
    assert doc["comparison"] == {"fedora_below_local": 1}  # client 0 only (0.5 == 0.5 is not below)


def test_every_methods_selected_row_names_its_round() -> None:
    """`methods.<name>.selected.{mean,min,max,std,per_client,round}` is a path users' scripts
    read for every row: the fedavg_ft row had no round (a KeyError for a loop over methods).
    Its metric is of FedAvg's final model, fine-tuned: the round is FedAvg's last."""
    outcomes = {"fedavg": _entry("fedavg", [0.4] * 3, {"finetuned_test_accuracy": [0.5] * 3})}
    outcomes["fedavg"]["rounds"] = 7
    doc = _build(_config(["fedavg"]), outcomes)
    for name, body in doc["methods"].items():
        assert set(body["selected"]) >= {"mean", "min", "max", "std", "per_client", "round"}, name
    assert doc["methods"]["fedavg_ft"]["selected"]["round"] == 7


def test_no_derived_entries_without_their_inputs() -> None:
    outcomes = {"fedora": _entry("fedora", [0.6, 0.9, 0.5]), "fedavg": _entry("fedavg", [0.4] * 3)}
    doc = _build(_config(["fedora", "fedavg"]), outcomes)
    assert list(doc["methods"]) == ["fedora", "fedavg"] and doc["comparison"] == {}


def test_client_held_models_assumption_is_declared_by_ditto_and_apfl_under_dp() -> None:
    expected = ("Ditto's and APFL's personal models never leave the client and train without "
                "noise; DP covers what is sent (the global-model copies). Publishing a personal "
                "model would be an unaccounted release, and their reported test metrics "
                "(evaluations of these models) are not covered by the DP guarantee.")
    for methods in (["ditto"], ["apfl", "ditto"]):
        assert _build(_config(methods, dp=True), {})["assumptions"]["client_held_models"] == expected
    assert "client_held_models" not in _build(_config(["ditto"]), {})["assumptions"]
    assert "client_held_models" not in _build(_config(["fedora"], dp=True), {})["assumptions"]


def test_a_dp_run_states_what_its_epsilon_does_not_cover() -> None:
    """Published test metrics, several methods on the same data, FedAvg's fine-tuned copies:
    each is stated in the assumptions of a DP run (and absent without DP)."""
    a = _build(_config(["fedora", "fedavg"], dp=True), {})["assumptions"]
    assert "test split is treated as public" in a["evaluation"]
    assert "validation metrics are computed only when they choose" in a["evaluation"]
    assert "composes their budgets" in a["methods_compared"]
    assert "not covered by the DP guarantee" in a["fedavg_finetuning"]
    assert "not differentially private" in a["data_fingerprint"]
    one = _build(_config(["fedora"], dp=True), {})["assumptions"]
    assert "evaluation" in one and "methods_compared" not in one and "fedavg_finetuning" not in one
    plain = _build(_config(["fedora", "fedavg"]), {})["assumptions"]
    assert not {"evaluation", "methods_compared", "fedavg_finetuning", "data_fingerprint"} & set(plain)


def test_a_plug_in_declares_its_own_rows_and_may_not_replace_a_path() -> None:
    class Shadow(Local):
        name = "shadow_x"

        @classmethod
        def derived_rows(cls, name: str, outcome: dict) -> dict[str, list[float]]:
            return {f"{name}_twice": [2 * v for v in outcome["selected"]["per_client"]]}

        @classmethod
        def comparisons(cls, name: str, outcomes: dict) -> dict[str, Any]:
            return {"fedora_below_local": -1}  # collides with FEDORA's when both run

    METHODS.register("shadow_x", Shadow)
    try:
        doc = _build(_config(["shadow_x"]), {"shadow_x": _entry("shadow_x", [0.25, 0.5, 0.5])})
        assert doc["methods"]["shadow_x_twice"]["selected"]["per_client"] == [0.5, 1.0, 1.0]
        assert doc["comparison"] == {"fedora_below_local": -1}
        outcomes = {"fedora": _entry("fedora", [0.6] * 3), "local": _entry("local", [0.7] * 3),
                    "shadow_x": _entry("shadow_x", [0.1] * 3)}
        with pytest.raises(ValueError, match="comparison.fedora_below_local is produced twice"):
            _build(_config(["fedora", "local", "shadow_x"]), outcomes)
    finally:
        METHODS.unregister("shadow_x")


def test_fedprox_states_no_fine_tuning_it_does_not_do() -> None:
    """FedProx inherited FedAvg's assumptions: a DP run of FedProx without FedAvg stated
    assumptions.fedavg_finetuning (a fedavg_ft metric 'not covered by DP') although FedProx
    never fine-tunes and no fedavg_ft row exists."""
    assert "fedavg_finetuning" not in _build(_config(["fedprox"], dp=True), {})["assumptions"]
    both = _build(_config(["fedprox", "fedavg"], dp=True), {})["assumptions"]
    assert "not covered by the DP guarantee" in both["fedavg_finetuning"]


def test_a_fine_tuned_row_of_a_method_built_on_fedavg_is_stated_under_dp() -> None:
    """A method registered on FedAvg (README's fedavgm: its own finetune_epochs) reported a
    fedavgm_ft row under DP with no statement that DP does not cover it: FedAvg's assumption
    read [fedavg] finetune_epochs, not what the run fine-tuned."""
    from secure_fedora.algorithms.methods import FedAvg

    def build(ctx: Any, cfg: Any) -> FedAvg:
        return FedAvg(ctx, finetune_epochs=1)

    build.algorithm = FedAvg  # type: ignore[attr-defined]
    METHODS.register("fedavg_x", build)
    try:
        cfg = parse_config({"methods": ["fedavg_x"], "fedavg": {"finetune_epochs": 0},
                            "data": {"num_clients": 3, "train_per_client": 40},
                            "privacy": {"enabled": True, "epsilon": 5.0, "delta": 1e-3}})
        tuned = {"fedavg_x": _entry("fedavg_x", [0.4] * 3, {"finetuned_test_accuracy": [0.5] * 3})}
        stated = _build(cfg, tuned)["assumptions"]
        assert "fedavg_x_ft test metric is not covered by the DP guarantee" in \
            stated["fedavg_x_finetuning"]
        assert "fedavg_finetuning" not in stated
        untuned = {"fedavg_x": _entry("fedavg_x", [0.4] * 3)}
        assert "fedavg_x_finetuning" not in _build(cfg, untuned)["assumptions"]
        plain = _config(["fedavg_x"])
        assert "fedavg_x_finetuning" not in _build(plain, tuned)["assumptions"]
    finally:
        METHODS.unregister("fedavg_x")


def test_a_subclass_of_fedavg_run_alone_states_its_own_fine_tuning_not_fedavgs() -> None:
    """A method registered as a subclass of FedAvg, run without FedAvg under DP, inherited
    FedAvg's assumption: results.json (and the sweep's summary) stated that "the reported
    fedavg_ft test metric is not covered", a row no run produced, beside its own
    <name>_finetuning."""
    from secure_fedora.algorithms.methods import FedAvg

    class MyAvg(FedAvg):
        pass

    METHODS.register("myavg_x", MyAvg)
    try:
        tuned = {"myavg_x": _entry("myavg_x", [0.4] * 3, {"finetuned_test_accuracy": [0.5] * 3})}
        stated = _build(_config(["myavg_x"], dp=True), tuned)["assumptions"]
        assert "myavg_x_ft test metric is not covered" in stated["myavg_x_finetuning"]
        assert "fedavg_finetuning" not in stated
        tuned["fedavg"] = _entry("fedavg", [0.4] * 3, {"finetuned_test_accuracy": [0.5] * 3})
        both = _build(_config(["myavg_x", "fedavg"], dp=True), tuned)["assumptions"]
        assert "fedavg_ft test metric is not covered" in both["fedavg_finetuning"]
    finally:
        METHODS.unregister("myavg_x")


def test_a_subclass_of_fedavg_with_its_own_name_states_its_own_fine_tuning() -> None:
    """A FedAvg subclass setting ``name`` to its registry name, run alone under DP with
    fine-tuning, stated assumptions.fedavg_finetuning (a fedavg_ft row no run produced) and
    nothing for its own myavg_y_ft row: both checks compared with ``cls.name``."""
    from secure_fedora.algorithms.methods import FedAvg

    class MyAvg(FedAvg):
        name = "myavg_y"

    METHODS.register("myavg_y", MyAvg)
    try:
        tuned = {"myavg_y": _entry("myavg_y", [0.4] * 3, {"finetuned_test_accuracy": [0.5] * 3})}
        stated = _build(_config(["myavg_y"], dp=True), tuned)["assumptions"]
        assert "fedavg_finetuning" not in stated
        assert "myavg_y_ft test metric is not covered" in stated["myavg_y_finetuning"]
        tuned["fedavg"] = _entry("fedavg", [0.4] * 3, {"finetuned_test_accuracy": [0.5] * 3})
        both = _build(_config(["myavg_y", "fedavg"], dp=True), tuned)["assumptions"]
        assert "fedavg_ft test metric is not covered" in both["fedavg_finetuning"]
        assert "myavg_y_ft test metric is not covered" in both["myavg_y_finetuning"]
    finally:
        METHODS.unregister("myavg_y")


def test_non_finite_figures_are_written_as_null_and_named() -> None:
    """A NaN or infinity a method reported went into results.json as the tokens NaN/Infinity,
    which strict JSON readers refuse; each is now null and named under non_finite_values."""
    import json

    outcomes = {"local": _entry("local", [0.5, 0.5, 0.5],
                                {"score": float("nan"), "ratios": [1.0, float("inf")]})}
    doc = _build(_config(["local"]), outcomes)
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text)["methods"]["local"]["extra"] == {"score": None, "ratios": [1.0, None]}
    assert doc["non_finite_values"] == {"/methods/local/extra/score": "nan",
                                        "/methods/local/extra/ratios/1": "inf"}
    assert "non_finite_values" not in _build(_config(["local"]), {"local": _entry("local", [0.5] * 3)})


def test_fedora_compares_with_every_local_only_method_it_ran_with_not_a_name() -> None:
    """FEDORA's 'below Local' count was made only against the method registered as 'local':
    a local-only plug-in (sends_messages = False, e.g. Local under another name) got none. It
    is now made against every method of the run declaring sends_messages = False, named
    after it; the built-in's path is unchanged."""
    class OwnLocal(Local):
        pass

    METHODS.register("own_local_x", OwnLocal)
    try:
        outcomes = {"fedora": _entry("fedora", [0.6, 0.9, 0.5]),
                    "own_local_x": _entry("own_local_x", [0.7, 0.8, 0.5]),
                    "fedavg": _entry("fedavg", [0.9, 0.9, 0.9])}
        doc = _build(_config(["fedora", "own_local_x", "fedavg"]), outcomes)
        assert doc["comparison"] == {"fedora_below_own_local_x": 1}
        outcomes["local"] = _entry("local", [0.7, 0.95, 0.6])
        doc = _build(_config(["fedora", "own_local_x", "fedavg", "local"]), outcomes)
        assert doc["comparison"] == {"fedora_below_own_local_x": 1, "fedora_below_local": 3}
    finally:
        METHODS.unregister("own_local_x")


def test_kept_results_allow_only_what_a_resume_appended_to_a_run_record(tmp_path):
    """A record the resume continues (key path -> its length in the checkpoint) may have grown
    in the resume's document; the held one must hold exactly the checkpointed entries."""
    import json

    from secure_fedora.runtimes.results import kept_results

    made = {"name": "r", "events": [{"e": 1}, {"e": "resume's first contact"}],
            "security": {"rejections": [{"r": 1}]}}
    appended = {("events",): 1, ("security", "rejections"): 1}
    path = tmp_path / "results.json"
    warnings: list[str] = []
    for events, kept in (([{"e": 1}], True), ([], False), ([{"e": 2}], False),
                         ([{"e": 1}, {"e": 3}], False)):
        held = {**made, "events": events}
        path.write_text(json.dumps(held))
        got = kept_results(path, made, anchored=None, warn=warnings.append, appended=appended)
        assert (got == held) if kept else got is None, events
    path.write_text(json.dumps({**made, "events": [{"e": 1}], "security": {"rejections": []}}))
    assert kept_results(path, made, anchored=None, warn=warnings.append, appended=appended) is None
    assert len(warnings) == 4


def test_the_checkpoints_statement_names_the_run_s_methods_that_keep_unnoised_state() -> None:
    """An in-process DP run's ``assumptions.checkpoints`` named Ditto's and APFL's personal
    models in every DP run, also in one of FedAvg and FEDORA, whose checkpoints hold neither.
    It now names what each of the run's methods declares it keeps without noise
    (``unreleased_client_state``: a subclass inherits it, a plug-in declares its own), and a
    run whose methods declare none says what its checkpoints hold instead."""
    from secure_fedora.algorithms.baselines import Ditto
    from secure_fedora.algorithms.methods import FedAvg
    from secure_fedora.runtimes.results import checkpoints_statement

    plain = checkpoints_statement(_config(["fedavg", "fedora"], dp=True))
    assert "Ditto" not in plain and "APFL" not in plain and "personal" not in plain
    assert "checkpoints/ holds every client's own state" in plain
    assert "trained with DP-SGD" in plain and "(fedavg, fedora) declares" in plain
    ditto = checkpoints_statement(_config(["ditto"], dp=True))
    assert "(ditto: its personal models, trained without noise)" in ditto
    assert "apfl" not in ditto and "DP does not cover it" in ditto and "other methods" not in ditto
    both = checkpoints_statement(_config(["fedavg", "apfl"], dp=True))
    assert "(apfl: its personal models and mixing weights alpha, learned without noise)" in both
    assert "ditto" not in both and "the other methods' (fedavg) client state" in both

    class MyDitto(Ditto):
        pass

    class Keeper(FedAvg):
        unreleased_client_state = "a running mean of its inputs, never noised"

    METHODS.register("myditto_c", MyDitto)
    METHODS.register("keeper_c", Keeper)
    try:
        stated = checkpoints_statement(_config(["myditto_c", "keeper_c"], dp=True))
        assert "myditto_c: its personal models, trained without noise" in stated
        assert "keeper_c: a running mean of its inputs, never noised" in stated
    finally:
        METHODS.unregister("myditto_c")
        METHODS.unregister("keeper_c")


@pytest.mark.parametrize("mode", ["withheld", "full"])
def test_only_a_run_of_a_method_that_releases_lambda_states_fedoras_pull_tag(mode) -> None:
    """results.json's ``assumptions.client_errors`` said that an error text can carry
    FEDORA's pull-divergence tag, "a fact of the lambda a round reply carries", in every
    run, also in one of Local or FedAvg alone, whose replies carry no lambda. It is now
    stated exactly when a method of the run declares ``lambda`` among its round reply's
    entries (FEDORA, or a method built on it under its own name)."""
    from secure_fedora.algorithms.methods import Fedora

    def stated(methods: list[str]) -> str:
        cfg = parse_config({"methods": methods, "data": {"num_clients": 3},
                            "privacy": {"enabled": True, "epsilon": 5.0},
                            "fedora": {"relatedness": "noised"},
                            "security": {"client_errors": mode}})
        return _build(cfg, {})["assumptions"]["client_errors"]

    tag = "FEDORA's pull diverged" if mode == "withheld" else "for a diverged pull, its fixed tag"
    for methods in (["local"], ["fedavg"], ["fedavg", "ditto"]):
        text = stated(methods)
        assert tag not in text and "lambda" not in text and "pull" not in text
        assert text.startswith(mode)
    for methods in (["fedora"], ["local", "fedora"]):
        assert tag in stated(methods)
    if mode == "withheld":
        assert "(a fact of the lambda a round reply carries)" in stated(["fedora"])
        assert "corrupt file). Whether a client errs" in stated(["local"])
    else:
        assert "(the error's class, a fixed sentence). In process" in stated(["local"])

    class MyFedora(Fedora):
        pass

    METHODS.register("myfedora_l", MyFedora)
    try:
        assert tag in stated(["myfedora_l"])
    finally:
        METHODS.unregister("myfedora_l")


@pytest.mark.parametrize("mode", ["withheld", "full"])
def test_a_run_of_a_factory_that_names_no_class_states_fedoras_pull_tag_as_possible(mode) -> None:
    """A method registered as a factory that names no class declares nothing this process
    can read, and its replies may carry FEDORA's lambda; results.json's
    ``assumptions.client_errors`` said "no lambda" for it (no pull tag), where the audit
    report names every entry. It now names the pull's tag as possible and the method whose
    replies are not declared; a method declaring lambda beside it states the tag as before."""
    from secure_fedora.algorithms.methods import Fedora
    from secure_fedora.runtimes.results import releases_lambda

    def factory(ctx, cfg):  # type: ignore[no-untyped-def]  # names no class (no .algorithm)
        return Fedora.from_config(ctx, cfg)

    def stated(methods: list[str]) -> str:
        cfg = parse_config({"methods": methods, "data": {"num_clients": 3},
                            "security": {"client_errors": mode}})
        return _build(cfg, {})["assumptions"]["client_errors"]

    METHODS.register("classless_f", factory)
    try:
        cfg = parse_config({"methods": ["local", "classless_f"], "data": {"num_clients": 3}})
        assert releases_lambda(cfg) is None  # unknown, not "no lambda"
        unknown = stated(["local", "classless_f"])
        fedora = stated(["classless_f", "fedora"])
    finally:
        METHODS.unregister("classless_f")
    if mode == "withheld":
        assert "What the replies of classless_f carry is not declared" in unknown
        assert "they may carry FEDORA's lambda" in unknown
        assert "the fixed tag \"FEDORA's pull diverged\"" in unknown
    else:
        assert ("a fixed sentence and, for a diverged pull, its fixed tag, possible as the "
                "replies of classless_f are not declared and may carry FEDORA's lambda). In "
                "process") in unknown
    assert fedora == stated(["fedora"])  # a declared lambda: the tag as before
    assert "not declared" not in stated(["local"])


def test_the_timing_statement_names_only_the_timing_records_a_run_holds() -> None:
    """Flower's ``assumptions.timing`` named ``relatedness_timing`` in every DP run, where
    only an encrypted relatedness ceremony fills it (a Local or FedAvg run's is empty). The
    one statement of both runtimes now names a run-level timing record only where it holds
    something; a record left out, another runtime's, or an unknown runtime is refused."""
    from secure_fedora.runtimes.results import timing_statement

    hello = {"hello": {"replies": 3}}
    held = timing_statement("flower", {"timings": hello, "relatedness_timing": {"wall_s": 0.5}})
    empty = timing_statement("flower", {"timings": hello, "relatedness_timing": {}})
    assert "in results.json also timings and relatedness_timing" in held
    assert "holds them too: the timings, relatedness_timing, every round's row" in held
    assert "relatedness_timing" not in empty
    assert "in results.json also timings)" in empty
    assert "holds them too: the timings, every round's row" in empty
    assert "checkpoint" in empty and "no ledger accounts them" in empty
    none = timing_statement("flower", {"timings": {}, "relatedness_timing": {}})
    assert "(timing, evaluation_timing) and each round's seconds" in none
    assert "holds them too: every round's row" in none
    process = timing_statement("in-process")
    assert "seconds_training" in process and "relatedness_timing" not in process
    for runtime, records in (("flower", {"timings": hello}), ("in-process", {"timings": hello}),
                             ("grid", {})):
        with pytest.raises(ValueError, match="timing"):
            timing_statement(runtime, records)
