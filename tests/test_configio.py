"""`xvla.configio`: the one coercer and override parser behind the model, training and demo configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from xvla import configio
from xvla.config import XVLAConfig, get_preset
from xvla.configio import ConfigError


@dataclass(frozen=True)
class Inner:
    depth: int = 2
    widths: tuple[int, ...] = (8, 16)


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    rate: float = 0.5
    maybe: float | None = None
    pair: tuple[float, float] = (0.9, 0.95)
    extra: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, float] = field(default_factory=dict)


def test_round_trip_restores_tuples_and_nested_sections() -> None:
    cfg = Outer(inner=Inner(3, (1, 2, 3)), maybe=0.1, extra={"a": [1, 2]}, budget={"x": 1.0})
    data = configio.to_dict(cfg)
    assert data["inner"]["widths"] == [1, 2, 3]  # JSON form
    assert configio.from_dict(Outer, data) == cfg


def test_values_are_coerced_by_type_hint() -> None:
    cfg = configio.from_dict(
        Outer, {"rate": 1, "maybe": "1e-4", "budget": {"x": 2}, "inner": {"widths": [4]}}
    )
    assert cfg.rate == 1.0 and isinstance(cfg.rate, float)
    assert cfg.maybe == 1e-4  # YAML 1.1 gives "1e-4" as a string
    assert cfg.budget == {"x": 2.0} and isinstance(cfg.budget["x"], float)
    assert cfg.inner.widths == (4,)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rat": 1.0}, r"unknown config key 'rat'; did you mean rate"),
        ({"inner": {"dpth": 1}}, r"unknown config key 'inner.dpth'; did you mean depth"),
        ({"inner": {"depth": "two"}}, r"inner.depth: expected int, got 'two'"),
        ({"inner": {"depth": True}}, r"inner.depth: expected int, got True"),
        ({"pair": [1.0]}, r"pair: expected a list of 2 values"),
        ({"inner": {"widths": 3}}, r"inner.widths: expected a list, got 3"),
        ({"maybe": [1]}, r"maybe: \[1\] matches none of"),
        ({"budget": {"x": "fast"}}, r"budget.x: expected float, got 'fast'"),
        ({"inner": 4}, r"inner: expected a mapping, got int"),
    ],
)
def test_bad_data_names_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        configio.from_dict(Outer, data)


def test_overrides_dotted_and_nested_and_into_free_form_dicts() -> None:
    cfg = Outer(extra={"keep": 1})
    new = configio.replace(
        cfg, configio.parse_overrides(["inner.depth=5", "rate=3e-4", "extra.deep.key=[1, 2]"])
    )
    assert (new.inner.depth, new.rate) == (5, 3e-4)
    assert new.extra == {"keep": 1, "deep": {"key": [1, 2]}}  # merged into the free-form dict, not replaced
    assert configio.replace(cfg, {"inner": {"widths": [1]}}).inner == Inner(2, (1,))
    assert configio.replace(cfg, {"maybe": None}).maybe is None
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.deep'; did you mean depth"):
        configio.replace(cfg, {"inner.deep": 1})
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE, e.g. rate=1"):
        configio.parse_overrides(["rate"], example="rate=1")


def test_parse_value_reads_yaml_and_json_numbers() -> None:
    assert configio.parse_value("3e-4") == 3e-4
    assert configio.parse_value("[a, b]") == ["a", "b"]
    assert configio.parse_value("{x: 1}") == {"x": 1}
    assert configio.parse_value("null") is None
    assert configio.parse_value("lora") == "lora"


def test_model_config_loads_typed_and_strict() -> None:
    demo = get_preset("demo")
    again = XVLAConfig.from_dict({"format": "xvla", **demo.to_dict()})
    assert again == demo and isinstance(again.vision.embed_dim, tuple)
    with pytest.raises(ValueError, match=r"XVLAConfig.image_size: expected int, got '64'"):
        XVLAConfig.from_dict({**demo.to_dict(), "image_size": "64"})
    with pytest.raises(ValueError, match=r"unknown config key 'XVLAConfig.head.widht'"):
        XVLAConfig.from_dict({"head": {"widht": 3}})


def test_changed_fields_names_every_differing_or_missing_key() -> None:
    from xvla.configio import changed_fields

    assert changed_fields({"a": 1, "b": [1, 2], "c": 3}, {"a": 1, "b": [1, 3], "d": 4}) == ["b", "c", "d"]
    assert changed_fields({"a": {"x": 1}}, {"a": {"x": 1}}) == []
