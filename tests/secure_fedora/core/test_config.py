"""Config validation: unknown keys and bad values are rejected with the key named."""

import copy
import math
import re
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from secure_fedora.core.config import (
    RUN_NAME_PATTERN,
    ConfigError,
    ExperimentConfig,
    check_settings_used,
    config_document,
    config_from_bytes,
    config_hash,
    load_config,
    parse_config,
)

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


@pytest.mark.parametrize("path", sorted([*CONFIGS.glob("*.toml"), *EXAMPLES.glob("*.toml")]),
                         ids=lambda p: p.name)
def test_shipped_configs_validate(path, caplog):
    """Each shipped config validates, and a run of it reads every key it sets (only the DP
    sweep config's training.clip_grad_norm, for its non-private cells, is warned about)."""
    cfg = load_config(path)
    assert cfg.data.num_clients >= 2
    check_settings_used(cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ([] if path.name != "dp_rotated_mnist.toml" else [
        "training.clip_grad_norm = 1 is unused: DP-SGD clips each sample's gradient to "
        "privacy.max_grad_norm instead; remove it (a sweep's non-private cells read it)"])


#: A config that runs FedAvg and Local only, without privacy.
_PLAIN = {"methods": ["local", "fedavg"], "data": {"num_clients": 3}}


def test_settings_the_run_would_not_read_are_refused_together(caplog):
    """[privacy] epsilon without enabled = true ran a non-private experiment without a word;
    so did every other key a run does not read. Refused: each privacy key with privacy off,
    a lambda noise key with public validation and a series tolerance beside an exact
    propagation, all in one error; warned: sections of methods not listed (scripts toggling
    methods keep them)."""
    cfg = parse_config({**_PLAIN, "privacy": {"epsilon": 3.0, "accountant": "pld",
                                              "model_selection": "final_round"},
                        "fedora": {"tau": 5.0}, "baselines": {"fedprox": {"mu": 0.1}}})
    with pytest.raises(ConfigError) as err:
        check_settings_used(cfg)
    assert str(err.value).splitlines() == [
        "2 settings of the config are unused by this run:",
        "  privacy.epsilon = 3 is unused: the config has [privacy] enabled = false, and a run "
        "without privacy reads no privacy setting; remove it, or enable [privacy]",
        '  privacy.accountant = "pld" is unused: the config has [privacy] enabled = false, and '
        "a run without privacy reads no privacy setting; remove it, or enable [privacy]"]
    assert [r.getMessage() for r in caplog.records] == [
        "fedora.tau = 5 is unused: no listed method (local, fedavg) reads [fedora]; remove it, "
        "or list a method that reads it",
        "[baselines.fedprox] (mu) is unused: no listed method (local, fedavg) reads it; remove "
        "it, or list the method"]
    dp = parse_config({"methods": ["fedora"], "data": {"num_clients": 3},
                       "fedora": {"relatedness": "noised", "propagation": "dense",
                                  "propagation_tolerance": 1e-3},
                       "fedavg": {"finetune_epochs": 2},
                       "privacy": {"enabled": True, "delta": 1e-3, "lambda_noise_multiplier": 2.0}})
    with pytest.raises(ConfigError) as err:
        check_settings_used(dp)
    lines = str(err.value).splitlines()
    assert lines[0] == "2 settings of the config are unused by this run:"
    assert lines[1].startswith("  privacy.lambda_noise_multiplier = 2 is unused: with "
                               'data.validation = "public"')
    assert lines[2].startswith('  fedora.propagation_tolerance = 0.001 is unused: it bounds the '
                               'truncated series of fedora.propagation = "sparse" only')
    # a run listing the methods, under the modes and privacy that read them, reads each
    caplog.clear()
    check_settings_used(parse_config({**_PLAIN, "methods": ["fedora", "fedprox", "fedavg"],
                                      "privacy": {"enabled": True, "epsilon": 3.0, "delta": 1e-3},
                                      "fedora": {"relatedness": "noised", "tau": 5.0},
                                      "baselines": {"fedprox": {"mu": 0.1}}}))
    assert not caplog.records


def test_unused_settings_only_warn_on_resume(caplog):
    """A run started before the check holds its unused keys in the config its checkpoints
    are bound to: a resume (or an audit of its directory) warns, naming each. A key written
    at its default is not named: a config written out with every default (a Python API
    run's config.toml, a model_dump) still runs."""
    cfg = parse_config({**_PLAIN, "privacy": {"epsilon": 3.0}})
    check_settings_used(cfg, resume=True)
    assert [r.getMessage() for r in caplog.records] == [
        "privacy.epsilon = 3 is unused: the config has [privacy] enabled = false, and a run "
        "without privacy reads no privacy setting"]
    caplog.clear()
    check_settings_used(parse_config(config_document(parse_config(_PLAIN))))
    assert not caplog.records


def test_a_privacy_key_written_at_its_default_without_enabled_is_refused(tmp_path):
    """[privacy] epsilon = 8 (its default) without enabled = true ran a non-private
    experiment without a word, from a TOML file and from the Python API's dict: what the user
    wrote is kept with the config and names it. A config written out with every default
    (enabled = false beside it) still passes, and the record changes no equality, dump or
    config hash."""
    from secure_fedora.api import Experiment

    written = {**_PLAIN, "privacy": {"epsilon": 8.0}}
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(written))
    refused = (r"^privacy.epsilon = 8 is unused: the config has \[privacy\] enabled = false, "
               r"and a run without privacy reads no privacy setting; remove it")
    in_code = ExperimentConfig.model_validate(written)  # no record: named only off its default
    check_settings_used(in_code)
    for cfg in (load_config(path), parse_config(written)):
        with pytest.raises(ConfigError, match=refused):
            check_settings_used(cfg)
        dumped = parse_config(config_document(cfg))
        check_settings_used(dumped)
        assert cfg == in_code == dumped
        assert config_hash(cfg) == config_hash(in_code) == config_hash(dumped)
        assert cfg.model_dump() == in_code.model_dump()
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=refused):
        Experiment(written, run_dir=run).run()
    assert not run.exists()
    # a built-in mechanism's table names the key it sets; a lambda key at its default
    # beside public validation left unwritten is as unused
    with pytest.raises(ConfigError, match=r"^privacy.summary_budget_fraction = 0.2 is unused"):
        check_settings_used(parse_config({**_PLAIN, "privacy": {"mechanisms": {
            "gaussian_summary": {"budget_fraction": 0.2}}}}))
    lam = {"methods": ["fedora"], "data": {"num_clients": 3}, "privacy": {
        "enabled": True, "lambda_clip": 2.0}, "fedora": {"relatedness": "noised"}}
    with pytest.raises(ConfigError, match=r'^privacy.lambda_clip = 2 is unused: with '
                                          r'data.validation = "public"'):
        check_settings_used(parse_config(lam))
    check_settings_used(parse_config(config_document(parse_config(lam))))


def test_reference_config_is_the_reference_setting():
    cfg = load_config(CONFIGS / "reference.toml")
    assert (cfg.data.num_clients, cfg.data.train_per_client, cfg.data.val_per_client) == (36, 128, 64)
    assert (cfg.fedora.q, cfg.fedora.tau, cfg.fedora.k, cfg.fedora.alpha) == (1, 10.0, 2, 0.8)
    t = cfg.training
    assert (t.lr, t.momentum, t.weight_decay, t.batch_size, t.local_epochs) == (5e-3, 0.9, 5e-5, 64, 5)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"trainig": {}}, "trainig"),
        ({"training": {"rounds": 0}}, "training.rounds"),
        ({"training": {"lr": -1}}, "training.lr"),
        ({"training": {"lr": "fast"}}, "training.lr"),
        ({"training": {"clip_grad_norm": 0}}, "training.clip_grad_norm"),
        ({"training": {"clip_grad_norm": "inf"}}, "training.clip_grad_norm"),
        ({"fedora": {"alpha": 1.0}}, "fedora.alpha"),
        ({"fedora": {"relatedness": "magic"}}, "fedora.relatedness"),
        ({"fedora": {"max_pull": 0}}, "fedora.max_pull"),
        ({"training": {"threads": 10**9}}, "training.threads"),
        ({"privacy": {"enabled": True, "overrides": {"00": {"epsilon": 1.0}}},
          "methods": ["local"]},
         "privacy.overrides.00: write the client index as 0"),
        ({"fedora": {"max_pull": 2}}, "fedora.max_pull"),
        ({"data": {"num_clients": 1}}, "data.num_clients"),
        ({"data": {"partition": "dirichlet", "test_per_client": 8}}, "dirichlet_alpha"),
        ({"data": {"partition": "dirichlet", "dirichlet_alpha": 0.1}}, "test_per_client"),
        ({"data": {"partition": "rotation", "classes_per_client": 2}}, "classes_per_client"),
        ({"data": {"rotation_interpolation": "cubic"}}, "data.rotation_interpolation"),
        ({"methods": ["fedora", "magic"]}, "methods.1"),
        ({"methods": ["fedora", "fedora"]}, "twice"),
        ({"data": {"colour": 1}}, "data.colour"),
        # finite but beyond float32 (or squared beyond float64): tracebacks mid-run before
        ({"training": {"lr": 1e300}}, "training.lr"),
        ({"training": {"weight_decay": 1e300}}, "training.weight_decay"),
        ({"privacy": {"max_grad_norm": 1e300}}, "privacy.max_grad_norm"),
        ({"privacy": {"summary_clip": 1e300}}, "privacy.summary_clip"),
        ({"privacy": {"lambda_clip": 1e300}}, "privacy.lambda_clip"),
        ({"privacy": {"noise_multiplier": 1e300}}, "privacy.noise_multiplier"),
        ({"privacy": {"summary_noise_multiplier": 1e7}}, "privacy.summary_noise_multiplier"),
        ({"privacy": {"lambda_noise_multiplier": 1e300}}, "privacy.lambda_noise_multiplier"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert key in str(err.value)


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nrounds = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[training]\nroundz = 3\n")
    with pytest.raises(ConfigError, match="training.roundz: unknown key"):
        load_config(unknown)


def test_config_hash_is_stable_and_sensitive():
    a = parse_config({})
    assert config_hash(a) == config_hash(parse_config({}))
    assert config_hash(a) != config_hash(parse_config({"seed": 1}))
    assert config_hash(a) != config_hash(parse_config({"training": {"clip_grad_norm": 1.0}}))


def test_config_hash_of_shipped_reference_is_unchanged_by_later_neutral_keys():
    # Checkpoints and sweep cells are bound to this hash; a key added later at its
    # behaviour-preserving default must not invalidate them.
    cfg = load_config(Path(__file__).parents[3] / "configs" / "reference.toml")
    assert cfg.training.clip_grad_norm is None
    assert config_hash(cfg) == "db2b9e169b64d0d402217a8ed55a3a714cbf802aa7e7bf2087c073cf94e5f209"


# --------------------------------------------------------------------------- strictness
# Regression tests for issue 14 "Why" 8: values that passed validation and crashed or hung later.

DP = {"privacy": {"enabled": True}, "fedora": {"relatedness": "noised"}}


def _with(base, **sections):
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, body in sections.items():
        doc[section] = {**doc.get(section, {}), **body} if isinstance(body, dict) else body
    return doc


@pytest.mark.parametrize(
    "data, key",
    [
        ({"training": {"rounds": True}}, "training.rounds"),
        ({"training": {"local_epochs": False}}, "training.local_epochs"),
        ({"data": {"num_clients": 8.0}}, "data.num_clients"),
        ({"training": {"lr": "0.1"}}, "training.lr"),
        ({"training": {"lr": True}}, "training.lr"),
        ({"security": {"envelopes": 1}}, "security.envelopes"),
        ({"training": {"lr": float("inf")}}, "training.lr"),
        ({"training": {"lr": float("nan")}}, "training.lr"),
        ({"training": {"weight_decay": float("inf")}}, "training.weight_decay"),
        ({"training": {"clip_grad_norm": float("inf")}}, "training.clip_grad_norm"),
        ({"fedora": {"tau": float("inf")}}, "fedora.tau"),
        ({"privacy": {"max_grad_norm": float("inf")}}, "privacy.max_grad_norm"),
        ({"privacy": {"summary_clip": float("nan")}}, "privacy.summary_clip"),
        ({"privacy": {"lambda_clip": float("inf")}}, "privacy.lambda_clip"),
        ({"privacy": {"noise_multiplier": float("inf")}}, "privacy.noise_multiplier"),
        ({"privacy": {"summary_noise_multiplier": float("inf")}}, "privacy.summary_noise_multiplier"),
        ({"privacy": {"lambda_noise_multiplier": float("nan")}}, "privacy.lambda_noise_multiplier"),
        ({"baselines": {"fedprox": {"mu": float("inf")}}}, "baselines.fedprox.mu"),
        ({"baselines": {"ifca": {"num_clusters": True}}}, "baselines.ifca.num_clusters"),
        ({"fedora": {"k": 8}, "data": {"num_clients": 8}}, "fedora.k"),
        ({"fedora": {"k": 40}}, "fedora.k"),
        ({"data": {"groups": 9, "num_clients": 8}}, "data.groups"),
        ({"data": {"dataset": "mnist", "partition": "pathological", "classes_per_client": 11,
                   "test_per_client": 8}}, "data.classes_per_client"),
        ({"name": "../../.."}, "name"),
        ({"name": "a/b"}, "name"),
        ({"name": ""}, "name"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**40}, "seed"),
        (_with(DP, privacy={"sample_rate": 1e-9}), "privacy.sample_rate"),
        (_with(DP, privacy={"overrides": {"³": {"epsilon": 1.0}}}), "privacy.overrides"),
        # int() refused the 5,000-digit index with a message naming no key
        (_with(DP, privacy={"overrides": {"1" * 5000: {"epsilon": 1.0}}}), "privacy.overrides"),
        # a NUL in the key store path was a raw ValueError traceback when the run opened it
        ({"security": {"keystore": "keys\x00"}}, "security.keystore"),
        # a key store of spaces passed, although --keystore "  " and the Python API refuse it
        ({"security": {"keystore": "  "}}, "security.keystore"),
        ({"security": {"keystore": "\t"}}, "security.keystore"),
        (_with(DP, training={"rounds": 2_000_000}), "training.rounds"),
        (_with(DP, privacy={"sample_rate": 0.01}, training={"rounds": 20_000, "local_epochs": 5}),
         "privacy.sample_rate"),
    ],
)
def test_strict_values_are_refused_with_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert key in str(err.value)


@pytest.mark.parametrize("key", [
    "data.num_clients", "data.train_per_client", "data.val_per_client", "data.test_per_client",
    "training.rounds", "training.local_epochs", "training.batch_size",
    "training.checkpoint_every", "fedora.q", "fedavg.finetune_epochs", "evaluation.every",
    "baselines.ifca.num_clusters",
])
@pytest.mark.parametrize("value", [2**63, 10**400], ids=["2**63", "10**400"])
def test_integers_beyond_int64_are_refused_with_the_key(tmp_path, key, value):
    """Counts reach torch and numpy as int64 (a batch size of 2**70 failed mid-training) and
    the config's own DP checks as floats (10**400 raised a raw OverflowError while
    validating); TOML files carry such integers too. Each is a ConfigError naming the key,
    from Python and from a file; 2**63 - 1 passes the bound."""
    doc = _with(DP, methods=["fedavg", "ifca"], baselines={"ifca": {"selection_split": "val"}})
    *sections, name = key.split(".")
    target = doc
    for section in sections:
        target = target.setdefault(section, {})
    target[name] = value
    problem = (rf"{re.escape(key)}: (Input should be less than or equal to|must be "
               "\"auto\" or a number of rounds from 1 to) 9223372036854775807")
    with pytest.raises(ConfigError, match=problem):
        parse_config(doc)
    path = tmp_path / "big.toml"
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(ConfigError, match=problem):
        load_config(path)
    target[name] = 2**63 - 1
    try:
        parse_config(doc)
    except ConfigError as err:  # other checks may refuse it (the DP plan), not the bound
        assert "Input should be less than or equal" not in str(err)


@pytest.mark.parametrize(("sizes", "key"), [({"val_per_client": 1}, "data.val_per_client = 1"),
                                             ({"train_per_client": 2}, "data.train_per_client = 2")])
def test_a_pathological_split_too_small_for_its_classes_is_refused_by_the_config(sizes, key):
    """Each client's train and validation rows hold one row of each of its classes: a smaller
    split was accepted by the config and refused only once the data was loaded."""
    data = {"partition": "pathological", "classes_per_client": 3, "test_per_client": 5, **sizes}
    with pytest.raises(ConfigError, match=f"{key} must be at least data.classes_per_client = 3"):
        parse_config({"data": data})
    parse_config({"data": {**data, **{k: 3 for k in sizes}}})


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "sometimes", "Auto", None, [2], 2**63,
                                   10**5000], ids=lambda v: f"{v!r:.12}" if v != 10**5000 else "10**5000")
def test_a_bad_checkpoint_every_is_one_line_naming_the_key(value):
    """checkpoint_every is a union (a count or "auto"): pydantic reported one line per member
    (``training.checkpoint_every.constrained-int: ...`` and ``...literal['auto']: ...``)."""
    with pytest.raises(ConfigError) as err:
        parse_config({"training": {"checkpoint_every": value}})
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 1
    assert lines[0].startswith('  training.checkpoint_every: must be "auto" or a '
                               'number of rounds from 1 to 9223372036854775807, got ')
    assert parse_config({"training": {"checkpoint_every": 3}}).training.checkpoint_every == 3


def test_an_integer_of_more_digits_than_python_reads_is_a_config_error(tmp_path):
    """A TOML integer of over 4,300 digits raised a raw ValueError from the TOML reader."""
    path = tmp_path / "digits.toml"
    path.write_text(f"[training]\nrounds = {'9' * 5000}\n")
    with pytest.raises(ConfigError, match=r"^config .*digits\.toml is not valid TOML: Exceeds the "
                                          r"limit \(4300 digits\)[^;]*$"):
        load_config(path)


@pytest.mark.parametrize("value", ["[" * 2000 + "]" * 2000, "{a = " * 2000 + "1" + "}" * 2000],
                         ids=["arrays", "inline_tables"])
def test_values_nested_too_deeply_are_a_config_error(tmp_path, value):
    """Arrays or inline tables nested some hundreds deep raised a raw RecursionError from the
    TOML reader (a traceback from ``secure-fedora run``)."""
    path = tmp_path / "deep.toml"
    path.write_text(f"[training]\nrounds = {value}\n")
    with pytest.raises(ConfigError, match=r"^config .*deep\.toml is not valid TOML: arrays or "
                                          r"inline tables nested too deeply"):
        load_config(path)


_NOISED = {"methods": ["fedora", "local"],
           "data": {"num_clients": 4, "train_per_client": 64, "val_per_client": 64,
                    "validation": "private"},
           "fedora": {"relatedness": "noised"}, "privacy": {"enabled": True, "delta": 1e-3}}


@pytest.mark.parametrize(("key", "refused", "accepted", "least"), [
    ("summary_clip", 1e-300, 1.2e-153, "1.2e-153 (rounded up)"),  # 1e-300 ** 2 / 64 is 0
    ("lambda_clip", 1e-306, 1e-300, "1.43e-306 (rounded up)"),
])
def test_a_clip_whose_release_sensitivity_underflows_is_refused(key, refused, accepted, least):
    """``privacy.summary_clip = 1e-300`` was accepted, then its noised summary's sensitivity
    ``clip^2 / n`` was 0 and the mechanism stopped the run mid-setup with "sensitivity must be
    a finite number > 0, got 0.0", naming no key. Only the releases the config makes count."""
    doc = copy.deepcopy(_NOISED)
    doc["privacy"][key] = refused
    with pytest.raises(ConfigError, match=rf"privacy\.{key} = {refused:g}: .* is below the "
                                          rf"smallest normal float .* at least "
                                          rf"{re.escape(least)}$"):
        parse_config(doc)
    doc["privacy"][key] = accepted
    assert getattr(parse_config(doc).privacy, key) == accepted
    # no noised summary, no private lambdas: the clip is never used, and still accepted
    doc["privacy"][key] = refused
    doc["methods"], doc["fedora"]["relatedness"], doc["data"]["validation"] = \
        ["local"], "plain", "public"
    assert getattr(parse_config(doc).privacy, key) == refused


def _number_after(text: str, words: str) -> float:
    """The number a message states right after ``words``."""
    found = re.search(re.escape(words) + r" ([-+0-9.e]+)", text)
    assert found is not None, text
    return float(found.group(1))


def test_the_least_clip_a_refusal_states_is_accepted():
    """"raise privacy.summary_clip to at least 1.49e-153" (sqrt(2.2250738585072014e-308 * 100)
    * 1.001 = 1.49316e-153 rounded to nearest) named a clip below the least one,
    1.49167e-153, that the same refusal then met: the stated bound is rounded up."""
    doc = copy.deepcopy(_NOISED)
    doc["data"]["train_per_client"] = 100
    doc["privacy"]["summary_clip"] = 1e-300
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    least = _number_after(str(err.value), "raise privacy.summary_clip to at least")
    assert str(err.value).endswith(" (rounded up)")
    doc["privacy"]["summary_clip"] = least
    assert parse_config(doc).privacy.summary_clip == least


@pytest.mark.parametrize("rows", [30, 49, 64, 3000])
def test_the_least_sample_rate_a_refusal_states_is_accepted(rows):
    """"use at least 1/n = 0.0333333" (1/30 to nearest at six digits) named a rate that the
    same refusal then met (0.0333333 * 30 < 1); 1/49 * 49 is below 1 in floats, too."""
    doc = _with(DP, privacy={"sample_rate": 0.5 / rows, "delta": 1e-5},
                data={"train_per_client": rows}, training={"rounds": 1, "local_epochs": 1})
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert "expects 0.5 records per batch" in str(err.value)
    least = _number_after(str(err.value), "use at least 1/n =")
    assert parse_config(_with(doc, privacy={"sample_rate": least})).privacy.sample_rate == least


def test_a_sample_rate_just_below_one_record_per_batch_reads_below_one():
    """0.99999999 expected records read "1 records per batch", beside "use at least"."""
    doc = _with(DP, privacy={"sample_rate": 0.0199999998, "delta": 1e-3},
                data={"train_per_client": 50})
    with pytest.raises(ConfigError, match=r"sample_rate = 0\.0199999998 expects 0\.99999999 "):
        parse_config(doc)


def test_the_stability_bound_a_refusal_states_is_exact():
    """"lower training.lr or training.weight_decay until the product is below 2.24692" (the
    bound 2 (1 + 0.12345835) = 2.2469167 to nearest at six digits): a product just below the
    stated figure was still refused. The bound is stated exactly, and so are the values."""
    doc = {"training": {"lr": 1.0, "momentum": 0.12345835, "weight_decay": 3.0000001}}
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    text = str(err.value)
    assert "= 1 * (3.0000001) = 3.0000001 reaches" in text
    bound = _number_after(text, "until the product is below")
    below = math.nextafter(bound, 0.0)
    doc["training"]["weight_decay"] = below
    assert parse_config(doc).training.weight_decay == below


def test_k_below_n_is_needed_only_when_fedora_runs():
    assert parse_config({"data": {"num_clients": 2}, "fedora": {"k": 1}}).fedora.k == 1
    assert parse_config({"data": {"num_clients": 2}, "methods": ["local", "fedavg"]}).fedora.k == 2


def test_dp_step_plan_limit_names_the_keys_and_the_maximum():
    from secure_fedora.core.config import MAX_PLANNED_DPSGD_STEPS

    with pytest.raises(ConfigError) as err:
        parse_config(_with(DP, privacy={"sample_rate": 0.001}, data={"train_per_client": 1000},
                           training={"rounds": 300, "local_epochs": 5}))
    text = str(err.value)
    assert "1,500,000 steps" in text and f"{MAX_PLANNED_DPSGD_STEPS:,}" in text
    assert "training.rounds" in text and "training.local_epochs" in text
    # the same plan, one order of magnitude shorter, is accepted
    cfg = parse_config(_with(DP, privacy={"sample_rate": 0.001}, data={"train_per_client": 1000},
                             training={"rounds": 30, "local_epochs": 5}))
    assert cfg.privacy.sample_rate == 0.001


def test_toml_inf_and_bool_are_refused_from_files(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[training]\nrounds = true\nlr = inf\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "training.rounds" in str(err.value) and "training.lr" in str(err.value)


def test_integral_floats_are_still_accepted_for_float_keys():
    cfg = parse_config({"training": {"lr": 1, "weight_decay": 0}, "fedora": {"tau": 10}})
    assert (cfg.training.lr, cfg.training.weight_decay, cfg.fedora.tau) == (1.0, 0.0, 10.0)
    assert isinstance(cfg.training.lr, float)


# --------------------------------------------------------------------------- property-based



def _literals(annotation, out):
    if get_origin(annotation) is Literal:
        out.update(a for a in get_args(annotation) if isinstance(a, str))
    for arg in get_args(annotation):
        _literals(arg, out)
    return out


def _keys():
    """Every (section, key) of the config model, and every literal string it accepts."""
    keys, literals = [], set()
    for name, field in ExperimentConfig.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for sub, sub_field in ann.model_fields.items():
                keys.append((name, sub))
                _literals(sub_field.annotation, literals)
        else:
            keys.append((None, name))
            _literals(ann, literals)
    return keys, sorted(literals)


KEYS, LITERALS = _keys()
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=2**63, max_value=10**400),  # TOML files carry them too
    st.integers(min_value=0, max_value=400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1e-12, max_value=1.0),
    _text,
    st.sampled_from(LITERALS),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(["0", "1", "fedprox", "mu", "epsilon", "x"]), SCALARS, max_size=2),
)


@st.composite
def toml_configs(draw):
    doc = {}
    if draw(st.booleans()):  # half the examples start from a DP config, so its checks run
        doc = {"privacy": {"enabled": True}, "fedora": {"relatedness": "noised"}}
    for section, key in draw(st.lists(st.sampled_from(KEYS), max_size=6, unique=True)):
        value = draw(VALUES)
        if section is None:
            doc[key] = value
        else:
            doc.setdefault(section, {})[key] = value
    return doc


def _plausible(annotation):
    """Values of the field's own type in a range that often validates."""
    literals = sorted(_literals(annotation, set()))
    if literals:
        return st.sampled_from(literals)
    args = set(get_args(annotation)) | {annotation}
    if bool in args:
        return st.booleans()
    if any(a is int or "[int" in repr(a) for a in args):
        return st.integers(min_value=0, max_value=40)
    if any(a is float or "[float" in repr(a) for a in args):
        return st.floats(min_value=1e-6, max_value=0.99)
    if str in args or "[str" in repr(annotation):
        return st.from_regex(RUN_NAME_PATTERN, fullmatch=True)
    return st.nothing()


_PLAUSIBLE = {
    (section, key): _plausible(
        (ExperimentConfig.model_fields[section].annotation.model_fields[key] if section
         else ExperimentConfig.model_fields[key]).annotation)
    for section, key in KEYS
}


@st.composite
def plausible_configs(draw):
    doc = {"data": {"num_clients": 6, "train_per_client": 32, "val_per_client": 8}}
    if draw(st.booleans()):
        doc.update({"privacy": {"enabled": True}, "fedora": {"relatedness": "noised"}})
    for section, key in draw(st.lists(st.sampled_from(KEYS), max_size=5, unique=True)):
        strategy = _PLAUSIBLE[(section, key)]
        if strategy.is_empty:
            continue
        value = draw(strategy)
        if section is None:
            doc[key] = value
        else:
            doc.setdefault(section, {})[key] = value
    return doc


def _finite_and_typed(value):
    if isinstance(value, float):
        assert value == value and abs(value) != float("inf")
    elif isinstance(value, dict):
        for v in value.values():
            _finite_and_typed(v)
    elif isinstance(value, list):
        for v in value:
            _finite_and_typed(v)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(toml_configs(), plausible_configs()))
def test_any_toml_config_validates_or_raises_config_error(doc):
    """Random TOML-able values for every key: a config either validates or raises
    ConfigError (never another exception), and a valid one round-trips through TOML."""
    text = tomli_w.dumps(doc)
    try:
        cfg = config_from_bytes(text.encode(), "(hypothesis)")
    except ConfigError as err:
        assert str(err)
        return
    dumped = cfg.model_dump(mode="json", exclude_none=True)
    _finite_and_typed(dumped)
    assert type(cfg.training.rounds) is int and type(cfg.data.num_clients) is int
    again = config_from_bytes(tomli_w.dumps(dumped).encode(), "(round trip)")
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_revalidate_refuses_values_only_their_json_form_makes_valid() -> None:
    """A ``model_copy(update=...)`` value was checked through its JSON form: the client index
    0 as a ``privacy.overrides`` key passed (as "0") and then the run, looking up "0", gave
    client 0 the default budget instead of its override; a section replaced by a number was
    an AttributeError."""
    import warnings

    from secure_fedora.core.config import ClientBudgetConfig, revalidate

    cfg = parse_config({"methods": ["local"], "data": {"num_clients": 4, "train_per_client": 16},
                        "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3}})
    overrides = cfg.privacy.model_copy(update={"overrides": {0: ClientBudgetConfig(epsilon=0.5)}})
    fine = cfg.privacy.model_copy(update={"overrides": {"0": ClientBudgetConfig(epsilon=0.5)}})
    assert revalidate(cfg.model_copy(update={"privacy": fine})).privacy.overrides["0"].epsilon == 0.5
    cases = [
        ({"privacy": overrides}, r"privacy.overrides.0.\[key\]: Input should be a valid string"),
        ({"training": cfg.training.model_copy(update={"threads": True})},
         "training.threads: Input should be a valid integer"),
        ({"name": b"run"}, "name: Input should be a valid string"),
        ({"model": 0}, "model: Input should be a valid dictionary or instance of ModelConfig"),
        ({"data": {}}, r"data: \{\} was set without validation"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no serializer warnings on the way
        for update, message in cases:
            with pytest.raises(ConfigError, match=message):
                revalidate(cfg.model_copy(update=update))


@pytest.mark.parametrize("path, why", [("", "is empty: name a file"),
                                       ("  ", "is empty: name a file"),
                                       ("c\x00.toml", "holds a NUL character")])
def test_load_config_refuses_an_empty_or_nul_path(path, why):
    """load_config("c\\x00.toml") (and Experiment("c\\x00.toml")) raised a bare ValueError
    ('embedded null byte'), load_config("") 'cannot read config .: Is a directory'."""
    from secure_fedora.api import Experiment

    for call in (load_config, Experiment):
        with pytest.raises(ConfigError, match=f"the config path.*{why}"):
            call(path)
    with pytest.raises(ConfigError, match="the config path must be a path"):
        load_config(7)  # type: ignore[arg-type]


def test_load_config_refuses_a_fifo_at_once_and_names_a_directory(tmp_path):
    """A config path that is a FIFO made load_config (and `secure-fedora run`) wait for a
    writer forever; a directory is named as one."""
    from tests.fifo_support import fifo_without_writer

    with fifo_without_writer(tmp_path / "config.toml") as fifo:
        with pytest.raises(ConfigError, match=r"cannot read config .*config\.toml: not a regular "
                                              r"file \(a FIFO"):
            load_config(fifo)
        with pytest.raises(ConfigError, match=r"cannot read config .*: Is a directory$"):
            load_config(tmp_path)
        with pytest.raises(ConfigError, match=r"cannot read config .*: No such file or directory"):
            load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_weight_decay_at_the_local_step_bound_is_refused_and_just_below_is_not(momentum):
    """lr * weight_decay >= 2 (1 + momentum) makes every local run diverge whatever the data
    (the hunt's weight_decay = 1e6 ran to finite garbage): refused when read, naming the keys,
    the product and the bound; a product just below is a valid config."""
    bound = 2.0 * (1.0 + momentum)
    with pytest.raises(ConfigError) as err:
        parse_config({"training": {"lr": 0.5, "momentum": momentum, "weight_decay": 2.0 * bound}})
    text = str(err.value)
    assert "training.lr * (training.weight_decay) = 0.5 * " in text
    assert f"= {bound:g} " in text and f"2 (1 + training.momentum) = {bound:g}" in text
    assert "lower training.lr or training.weight_decay" in text
    below = parse_config({"training": {"lr": 0.5, "momentum": momentum,
                                       "weight_decay": 2.0 * bound * 0.999}})
    assert below.training.weight_decay == 2.0 * bound * 0.999
    with pytest.raises(ConfigError, match="training.weight_decay"):
        parse_config({"training": {"lr": 0.05, "weight_decay": 1e6}})


def test_a_max_pull_at_or_above_the_pulls_stability_limit_is_refused():
    """With weight decay the pull diverges from 2 - lr * wd / (1 + momentum) on (1.842 at lr
    0.1, wd 3, momentum 0.9), not from 2: max_pull = 1.9 was accepted and let every pull
    diverge. Refused when read, naming the key, the limit and the values; below is valid, and
    without weight decay the limit stays 2."""
    training = {"lr": 0.1, "weight_decay": 3.0, "momentum": 0.9}
    for max_pull in (1.9, 1.85):
        with pytest.raises(ConfigError) as err:
            parse_config({"training": training, "fedora": {"max_pull": max_pull}})
        text = str(err.value)
        assert f"fedora.max_pull = {max_pull!r} reaches the pull's stability limit 2 - " \
            "training.lr * training.weight_decay / (1 + training.momentum) = " \
            f"{2 - 0.1 * 3.0 / 1.9!r}" in text
        assert "training.weight_decay = 3" in text
    # a limit just below 2 and a max_pull between them: the message showed "1.9999999 reaches
    # ... = 2", both rounded; each is now written exactly
    with pytest.raises(ConfigError) as err:
        parse_config({"training": {"lr": 0.1, "weight_decay": 1e-6},
                      "fedora": {"max_pull": 1.99999995}})
    assert "fedora.max_pull = 1.99999995 reaches the pull's stability limit 2 - training.lr * " \
        "training.weight_decay / (1 + training.momentum) = 1.9999999" in str(err.value)
    assert parse_config({"training": training, "fedora": {"max_pull": 1.84}}).fedora.max_pull \
        == 1.84
    assert parse_config({"training": {**training, "weight_decay": 0.0},
                         "fedora": {"max_pull": 1.99}}).fedora.max_pull == 1.99
    # a config that does not run FEDORA does not use max_pull
    assert parse_config({"training": training, "methods": ["local"],
                         "fedora": {"max_pull": 1.9}}).fedora.max_pull == 1.9


def test_fedoras_checks_apply_to_a_config_that_runs_fedora_only():
    """A max_pull beyond the pull's limit is accepted by a config that does not list FEDORA,
    as every other check of FEDORA's (its check_config: k below N, CKKS packing, the series
    length, the power iteration's bound, an accounted relatedness under DP): the [fedora]
    section is unused there. Listing FEDORA refuses each, naming its key."""
    base = {"data": {"num_clients": 4}, "training": {"lr": 0.1, "weight_decay": 3.0}}
    cases = [({"fedora": {"max_pull": 1.9}}, "fedora.max_pull = 1.9 reaches"),
             ({"fedora": {"k": 4}}, "fedora.k = 4 must be smaller than data.num_clients = 4"),
             ({"fedora": {"propagation": "sparse", "alpha": 0.999999,
                          "propagation_tolerance": 1e-9}}, "fedora.propagation 'sparse'"),
             ({"fedora": {"propagation": "power", "alpha": 0.9999}}, "fedora.propagation 'power'"),
             ({"fedora": {"relatedness": "encrypted", "q": 1025}}, "4100 summary columns"),
             ({"privacy": {"enabled": True}}, "fedora.relatedness 'plain' releases summary")]
    for update, message in cases:
        doc = {**base, **update}
        for methods in (["local", "fedavg"], ["fedprox"]):
            assert parse_config({**doc, "methods": methods}).methods == methods
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({**doc, "methods": ["local", "fedora"]})


def test_a_plug_in_named_as_a_results_entry_another_method_derives_is_refused() -> None:
    """A plug-in method named ``fedavg_ft`` beside fine-tuning FedAvg validated, trained every
    method, then stopped with a bare ValueError writing results.json (both produce
    ``methods.fedavg_ft``). The config now refuses it before anything runs."""
    from secure_fedora.algorithms.methods import FedAvg, Local
    from secure_fedora.core.registry import METHODS

    class Named(Local):
        pass

    class MyAvg(FedAvg):
        finetunes = True

    base = {"data": {"num_clients": 3, "train_per_client": 60, "val_per_client": 20,
                     "test_per_client": 20, "groups": 3}}
    METHODS.register("fedavg_ft", Named)
    METHODS.register("myavg", MyAvg)
    METHODS.register("myavg_ft", Named)
    try:
        with pytest.raises(ConfigError, match=r"'fedavg' adds the results entry methods\."
                                              r"fedavg_ft, the entry of the listed method "
                                              r"'fedavg_ft'.*another name"):
            parse_config({**base, "methods": ["fedavg", "fedavg_ft"],
                          "fedavg": {"finetune_epochs": 1}})
        with pytest.raises(ConfigError, match=r"'myavg' adds the results entry methods\.myavg_ft"):
            parse_config({**base, "methods": ["myavg_ft", "myavg"]})
        # FedAvg without fine-tuning adds no row: the name is free, as before
        parse_config({**base, "methods": ["fedavg", "fedavg_ft"], "fedavg": {"finetune_epochs": 0}})
        parse_config({**base, "methods": ["myavg", "fedavg", "fedora"]})
    finally:
        for name in ("fedavg_ft", "myavg", "myavg_ft"):
            METHODS.unregister(name)


def _readme_config_table() -> dict[str, str]:
    """README's "Config keys at a glance" table: section -> its row's text."""
    text = (CONFIGS.parent / "README.md").read_text()
    table = text.split("### Config keys at a glance", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 2 and cells[0].startswith("`["):
            rows[cells[0].strip("`")] = cells[1]
    return rows


@pytest.mark.parametrize("section, key, choices", [
    ("data", "dataset", "DATASETS"),
    ("data", "partition", "PARTITIONERS"),
    ("data", "validation", None),
    ("model", "name", "MODELS"),
    ("fedora", "relatedness", None),
    ("fedora", "propagation", None),
    ("privacy", "accountant", "ACCOUNTANTS"),
    ("privacy", "noise", None),
    ("data", "rotation_interpolation", None),
    ("training", "engine", None),
    ("training", "device", None),
    ("security", "client_errors", None),
])
def test_readme_config_table_lists_every_choice_and_each_parses(section, key, choices):
    """Every choice of the keys the issues name (fedora.relatedness = "encrypted", model.name =
    "cnn", ...) is in README's table, and each choice written there is accepted by the schema."""
    from privacy.accounting import ACCOUNTANT_KINDS
    from secure_fedora.core import registry

    row = _readme_config_table()[f"[{section}]"]
    written = re.search(rf"`{key} = ([^`]*)`", row)
    assert written, f"README's [{section}] row does not show {key} = ..."
    listed = re.findall(r'"([^"]+)"', written.group(1))
    if choices is None:
        field = type(getattr(ExperimentConfig(), section)).model_fields[key]
        expected = set(get_args(field.annotation))
    elif choices == "ACCOUNTANTS":
        # the built-ins: a test's plug-in accountant may be registered in this process too
        expected = {"auto", *ACCOUNTANT_KINDS}
    else:
        expected = set(getattr(registry, choices))
    assert set(listed) == expected
    for value in listed:
        data = {section: {key: value}}
        if section == "privacy" or value.startswith("noised") or value == "private":
            data = {**data, "privacy": {**data.get("privacy", {}), "enabled": True},
                    "fedora": {"relatedness": "noised", **data.get("fedora", {})}}
        if value == "dirichlet":
            data["data"].update(dirichlet_alpha=0.5, test_per_client=32)
        if value == "pathological":
            data["data"].update(classes_per_client=2, test_per_client=32)
        parse_config(data)


def test_readme_config_table_names_every_key():
    """Every key the schema accepts is named in its section's row of README's table (the
    table left out fedora.propagation_tolerance and max_pull, the fixed noise multipliers,
    privacy.sample_rate and model_selection, and [baselines.<name>])."""
    rows = _readme_config_table()
    top = next(line for line in (CONFIGS.parent / "README.md").read_text().splitlines()
               if line.startswith("| top level |"))
    assert "[baselines.<name>]" in rows
    for key, field in ExperimentConfig.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            row = rows[f"[{key}]"]
            missing = [k for k in section.model_fields if not re.search(rf"`[^`]*\b{k}\b[^`]*`", row)]
            assert not missing, f"README's [{key}] row does not name {missing}"
        elif key != "baselines":
            assert f"`{key}" in top, key


def test_the_delta_bound_1_over_n_is_named_exactly():
    """The refusal named 1/n with :g (six digits, to nearest): at n = 6 it said "must be
    < 1/n = 0.166667", above 1/6, so the refused delta 0.1666667 read as meeting it."""
    base = {"data": {"num_clients": 4, "train_per_client": 6, "val_per_client": 6,
                     "test_per_client": 6},
            "fedora": {"relatedness": "noised"}}
    with pytest.raises(ConfigError, match=re.escape("must be < 1/n = 0.16666666666666666 ")):
        parse_config({**base, "privacy": {"enabled": True, "delta": 0.1666667}})
    with pytest.raises(ConfigError, match=re.escape("must be < 1/n = 0.125 ")):
        parse_config({**base, "data": {**base["data"], "train_per_client": 8},
                      "privacy": {"enabled": True, "delta": 0.2}})


def test_toml_key_names_a_key_as_a_table_header_must_write_it():
    """A message naming a table header wrote an empty or dotted name bare (`[t.]`, `[t.a.b]`);
    :func:`toml_key` writes a bare key bare and quotes any other, so TOML reads it back."""
    import tomllib

    from secure_fedora.core.config import toml_key

    assert toml_key("gaussian_lambda") == "gaussian_lambda" and toml_key("a-1") == "a-1"
    for name in ("", "my.mech", "a b", "tab\t", 'q"\\', "x\x7fy", "é", "line\nbreak"):
        key = toml_key(name)
        assert key.startswith('"')
        assert list(tomllib.loads(f"[t.{key}]\nv = 1\n")["t"]) == [name]
