"""Every choice is one Literal; validation, help and CLI choices derive from it."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from hydralora import HydraLoraConfig
from hydralora.cli import build_parser
from hydralora.clustering import AUTO_N_METHODS, METHODS as AUTO_N_DESCRIPTIONS, AutoNMethod
from hydralora.recipes.config import METHODS, Method, TrainConfig, build_spec
from hydralora.tuner import config as tc

ADAPTER_CHOICES = [("routing", tc.RoutingMode), ("router_input", tc.RouterInput), ("balance_loss", tc.BalanceLoss),
                   ("init_b", tc.InitB), ("bias", tc.Bias)]


def _field_type(cls, name):
    return typing.get_type_hints(cls, include_extras=True)[name]


@pytest.mark.parametrize("name,literal", ADAPTER_CHOICES)
def test_adapter_fields_are_typed_by_their_literal_and_reject_other_values(name, literal):
    assert _field_type(HydraLoraConfig, name) == literal
    for value in typing.get_args(literal):
        kwargs = {name: value, **({"fixed_gate": "mean"} if name == "routing" else {})}
        HydraLoraConfig(**kwargs)
    with pytest.raises(ValueError, match=rf"HydraLoraConfig\.{name}='bogus' is invalid: .*{typing.get_args(literal)[0]}"):
        HydraLoraConfig(**{name: "bogus"})


def test_recipe_choices_come_from_their_literals():
    assert METHODS == typing.get_args(Method) and _field_type(TrainConfig, "method") == Method
    assert tuple(AUTO_N_DESCRIPTIONS) == AUTO_N_METHODS == typing.get_args(AutoNMethod)
    with pytest.raises(ValueError, match="auto_n_method='bogus' is invalid"):
        build_spec({"auto_n_method": "bogus"})
    with pytest.raises(ValueError, match="eval_routing='bogus' is invalid"):
        build_spec({"eval_routing": "bogus"})
    assert {f.name for f in dataclasses.fields(TrainConfig)} >= {"method", "auto_n_method", "eval_routing"}


def test_cli_choices_come_from_the_literals():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    routing = next(a for a in sub["eval"]._actions if a.dest == "routing")
    method = next(a for a in sub["analyze"]._actions if a.dest == "method")
    assert tuple(routing.choices) == tc.ROUTING_MODES == typing.get_args(tc.RoutingMode)
    assert tuple(method.choices) == AUTO_N_METHODS
