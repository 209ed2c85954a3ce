"""config/bevplace.yaml from the nodes' declared parameters, so the file can never miss one.

python -m bevplace_ros.nodes.config_file > config/bevplace.yaml
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from bevplace_ros.nodes.parameters import ParamSpec

HEADER = """\
# bevplace_ros parameters: every parameter of the three nodes, at its default.
# Copy this file, change what your robot needs, and pass it as params_file:=... to the launch file
# or --ros-args --params-file ... to a node. "start-up only" parameters need a restart; the others
# can be changed with `ros2 param set` while running (out-of-range values are refused with a reason).
# Regenerate after changing a node: python -m bevplace_ros.nodes.config_file > config/bevplace.yaml
"""


def default_params_file() -> Path:
    """config/bevplace.yaml: installed share folder where there is one, else this source tree's."""
    from bevplace_ros.nodes.interfaces import package_share_file

    return package_share_file("config/bevplace.yaml")


def node_params() -> dict[str, Sequence[ParamSpec]]:
    from bevplace_ros.nodes import place_recognition_node, pose_graph_node, registration_node

    return {
        "place_recognition_node": place_recognition_node.PARAMS,
        "registration_node": registration_node.PARAMS,
        "pose_graph_node": pose_graph_node.PARAMS,
    }


def _comment(spec: ParamSpec) -> str:
    when = "" if spec.runtime else " (start-up only)"
    return f"# {spec.description} Accepted: {spec.accepted()}.{when}"


def _value(value: object) -> str:
    """YAML text that both PyYAML and rcl's parser read back as the same type (floats keep a '.')."""
    if isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        return text if "." in mantissa or "n" in text else f"{mantissa}.0" + (f"e{exponent}" if exponent else "")
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(value)


def render() -> str:
    lines = [HEADER]
    for node, specs in node_params().items():
        lines += [f"/**/{node}:", "  ros__parameters:"]
        for spec in specs:
            lines += [f"    {_comment(spec)}", f"    {spec.name}: {_value(spec.default)}"]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
