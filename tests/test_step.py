"""Config checking never switches itself off: unresolvable annotations are an error, and a
value that fits no member of a Union says why for each member."""

from __future__ import annotations

import typing
from dataclasses import dataclass

import pytest

from prefdata.step import MapStep, build_config

if typing.TYPE_CHECKING:
    from decimal import Decimal  # only for type checkers: not a name at run time


@dataclass
class NeedsTypeChecking:
    amount: Decimal = None
    label: str = "x"


def test_an_annotation_that_cannot_be_resolved_is_an_error_not_silence():
    with pytest.raises(TypeError) as err:
        build_config(NeedsTypeChecking, {"label": 3}, where="step 'demo'")
    message = str(err.value)
    assert "NeedsTypeChecking" in message and "'amount'" in message and "Decimal" in message
    assert "module level" in message


def test_a_forward_reference_to_a_class_defined_in_a_function_is_resolved():
    """``get_type_hints`` cannot see a local class; its own name is resolved here, so the
    other fields keep their type checks."""

    @dataclass
    class Node:
        weight: float = 1.0
        child: Node | None = None

    with pytest.raises(TypeError, match="option 'weight': expected a number, got 'heavy'"):
        build_config(Node, {"weight": "heavy"}, where="step 'demo'")
    assert build_config(Node, {"weight": 2}).weight == 2.0


def test_union_errors_say_why_each_member_failed():
    from prefdata.steps.reward import ScoreRMConfig

    with pytest.raises(TypeError) as err:
        build_config(ScoreRMConfig, {"model": 3}, where="step 'score_rm'")
    message = str(err.value)
    assert "option 'model': 3 does not fit str | list[str]" in message
    assert "expected a string, got 3" in message and "expected a list, got 3" in message


def test_union_with_a_literal_member_lists_the_choices():
    from prefdata.steps.cdr import ScoreCDRConfig

    with pytest.raises(TypeError) as err:
        build_config(ScoreCDRConfig, {"criteria": 5}, where="step 'score_cdr'")
    assert "str | dict[str, str] | None" in str(err.value) and "expected a mapping, got 5" in str(err.value)


def test_real_step_configs_type_check_through_the_step():
    from prefdata.steps.sample import Sample

    with pytest.raises(TypeError, match="step 'sample': option 'n': expected an integer, got '4'"):
        Sample(n="4")


class _Demo(MapStep):
    name = "demo"
    Config = NeedsTypeChecking


def test_a_step_with_an_unresolvable_config_fails_when_created():
    with pytest.raises(TypeError, match="'amount'"):
        _Demo(label="y")
