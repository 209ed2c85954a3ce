"""Declare a node's parameters once, with descriptions and ranges, and refuse bad updates.

Defaults come from the core's config dataclasses (one source of truth); `config/bevplace.yaml`
lists every parameter of every node with the same defaults (a test keeps them in step).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Sequence

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    low: float | None = None  # inclusive range for numbers
    high: float | None = None
    choices: tuple[str, ...] = ()
    runtime: bool = True  # False: read at start-up only; later changes are refused with a reason

    def accepted(self) -> str:
        if self.choices:
            return f"one of {list(self.choices)}"
        kind = {bool: "a bool", int: "an int", float: "a float", str: "a string", list: "a list of floats"}[type(self.default)]
        return kind if self.low is None else f"{kind} in [{self.low}, {self.high}]"

    def check(self, value: Any) -> str | None:
        """None when `value` is acceptable, else the reason it is not."""
        ok = (
            value in self.choices
            if self.choices
            else _same_type(self.default, value) and (self.low is None or self.low <= value <= self.high)
        )
        return None if ok else f"{self.name}={value!r} is not accepted: expected {self.accepted()}"

    def descriptor(self) -> ParameterDescriptor:
        text = self.description + ("" if self.runtime else " Read at start-up only.")
        descriptor = ParameterDescriptor(name=self.name, description=text, additional_constraints=f"expected {self.accepted()}")
        if self.low is not None and isinstance(self.default, int) and not isinstance(self.default, bool):
            descriptor.integer_range = [IntegerRange(from_value=int(self.low), to_value=int(self.high), step=0)]
        elif self.low is not None:
            descriptor.floating_point_range = [FloatingPointRange(from_value=float(self.low), to_value=float(self.high), step=0.0)]
        return descriptor


def _same_type(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    return isinstance(value, type(default))


class InvalidParameter(ValueError):
    """A parameter given at start-up is out of range or of the wrong type."""


def declare_parameters(node: Any, specs: Sequence[ParamSpec], on_change: Callable[[dict[str, Any]], str | None]) -> dict[str, Any]:
    """Declare `specs` on `node` and route later changes to `on_change`.

    A bad start-up value raises InvalidParameter naming the parameter and its accepted range.
    `on_change` returns None when it applied the new values, else the reason for refusing them.
    """
    by_name = {spec.name: spec for spec in specs}
    values = {}
    for spec in specs:
        try:
            values[spec.name] = node.declare_parameter(spec.name, spec.default, spec.descriptor()).value
        except (InvalidParameterValueException, InvalidParameterTypeException) as err:
            raise InvalidParameter(f"parameter {spec.name}: expected {spec.accepted()} ({err})") from None
        if reason := spec.check(values[spec.name]):
            raise InvalidParameter(reason)

    def callback(parameters: list[Any]) -> SetParametersResult:
        changed = {}
        for parameter in parameters:
            spec = by_name.get(parameter.name)
            if spec is None:
                continue
            reason = spec.check(parameter.value) or (None if spec.runtime else f"{spec.name} is read at start-up only; restart the node")
            if reason:
                return SetParametersResult(successful=False, reason=reason)
            changed[parameter.name] = parameter.value
        reason = on_change(changed) if changed else None
        return SetParametersResult(successful=reason is None, reason=reason or "")

    node.add_on_set_parameters_callback(callback)
    return values


def config_from_params(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build the core dataclass `cls` from parameters named `prefix + field`; others keep defaults."""
    return cls(**{f.name: values[prefix + f.name] for f in fields(cls) if prefix + f.name in values})


def updated_config(config: Any, values: dict[str, Any], prefix: str) -> Any:
    """`config` with the parameter changes under `prefix` applied; the dataclass validates them."""
    names = {f.name for f in fields(config)}
    changes = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix) and k[len(prefix):] in names}
    return replace(config, **changes) if changes else config


def specs_from_config(cls: type, prefix: str, docs: dict[str, tuple[str, float | None, float | None]], runtime: bool = True) -> list[ParamSpec]:
    """ParamSpecs for the fields of dataclass `cls` named in `docs` (field -> description, low, high)."""
    defaults = {f.name: f.default for f in fields(cls)}
    return [ParamSpec(prefix + name, defaults[name], text, low, high, runtime=runtime) for name, (text, low, high) in docs.items()]
