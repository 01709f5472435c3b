"""The ``experiment`` object of native flags: what it compiles to, and every way it is refused."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.engine import FlagError, compile_flag, variant_name, with_override

THREE = {"control": {"weight": 50}, "treatment_a": {"weight": 25}, "treatment_b": {"weight": 25}}


def flag(experiment: Any, **definition: Any) -> Any:
    return compile_flag("price", {"variants": THREE, **definition, "experiment": experiment})


def test_defaults_control_from_default_variant_and_a_72_hour_window() -> None:
    exp = flag({"goals": ["trade"]}, defaultVariant="treatment_a").experiment
    assert exp is not None
    assert exp.control == "treatment_a"
    assert exp.goals == ("trade",)
    assert exp.window_hours == 72
    assert exp.window_s == 72 * 3600
    # the flag's order, control first; the fallthrough's weights
    assert exp.weights == (("treatment_a", 25), ("control", 50), ("treatment_b", 25))


def test_boolean_flags_default_to_false_as_control_and_weigh_by_percentage() -> None:
    exp = compile_flag("new-checkout", {"percentage": 30, "experiment": {"goals": ["buy"]}}).experiment
    assert exp is not None
    assert exp.control is False
    assert exp.weights == ((False, 70), (True, 30))
    assert [variant_name(v) for v, _ in exp.weights] == ["false", "true"]


def test_explicit_control_and_window() -> None:
    exp = flag({"control": "treatment_b", "goals": ["a", "b"], "window_hours": 1.5}).experiment
    assert exp is not None and exp.control == "treatment_b" and exp.window_s == 5400
    assert exp.goals == ("a", "b")


def test_flags_without_the_object_are_no_experiments() -> None:
    assert compile_flag("plain", {"variants": THREE}).experiment is None


@pytest.mark.parametrize(
    ("experiment", "field", "message"),
    [
        ([], "flags.price.experiment", "expected an object"),
        ({"goals": ["a"], "window": 3}, "flags.price.experiment.window", "unknown field"),
        ({}, "flags.price.experiment.goals", "non-empty array"),
        ({"goals": []}, "flags.price.experiment.goals", "non-empty array"),
        ({"goals": "trade"}, "flags.price.experiment.goals", "non-empty array"),
        ({"goals": ["a", "a"]}, "flags.price.experiment.goals", "listed twice"),
        ({"goals": [""]}, "flags.price.experiment.goals[0]", "1..128"),
        ({"goals": ["x" * 129]}, "flags.price.experiment.goals[0]", "1..128"),
        ({"goals": ["ok", 7]}, "flags.price.experiment.goals[1]", "1..128"),
        ({"goals": ["a\nb"]}, "flags.price.experiment.goals[0]", "control characters"),
        (
            {"goals": ["a"], "control": "treatmnt"},
            "flags.price.experiment.control",
            "not one of the outcomes",
        ),
        ({"goals": ["a"], "control": True}, "flags.price.experiment.control", "not one of the outcomes"),
        ({"goals": ["a"], "window_hours": 0}, "flags.price.experiment.window_hours", "above 0"),
        ({"goals": ["a"], "window_hours": -1}, "flags.price.experiment.window_hours", "above 0"),
        ({"goals": ["a"], "window_hours": "72"}, "flags.price.experiment.window_hours", "above 0"),
        ({"goals": ["a"], "window_hours": True}, "flags.price.experiment.window_hours", "above 0"),
        ({"goals": ["a"], "window_hours": 10**6}, "flags.price.experiment.window_hours", "at most a year"),
    ],
)
def test_refusals_name_the_field(experiment: Any, field: str, message: str) -> None:
    with pytest.raises(FlagError) as caught:
        flag(experiment)
    assert caught.value.path == field
    assert message in caught.value.message


def test_a_boolean_flag_refuses_a_variant_name_as_control() -> None:
    with pytest.raises(FlagError) as caught:
        compile_flag("b", {"experiment": {"goals": ["a"], "control": "control"}})
    assert caught.value.path == "flags.b.experiment.control"


def test_kill_and_promote_end_the_experiment_but_keep_its_definition() -> None:
    base = flag({"goals": ["trade"]})
    assert base.experimenting
    promoted = with_override(base, {"promote": "treatment_b"})
    killed = with_override(base, {"kill": True})
    assert promoted.experiment == base.experiment and not promoted.experimenting
    assert promoted.overridden == "promoted" and killed.overridden == "killed"
    assert not killed.experimenting
    # a promotion of a variant the flag no longer has changes nothing: the experiment runs on
    assert with_override(base, {"promote": "gone"}).experimenting
