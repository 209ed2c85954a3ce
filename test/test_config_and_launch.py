"""config/bevplace.yaml, the nodes' declared parameters and launch/bevplace.launch.py agree."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import types

import pytest
import yaml
from rclpy.parameter import Parameter

from conftest import REPO_ROOT
from bevplace_ros.nodes import config_file
from bevplace_ros.nodes.parameters import InvalidParameter

NODE_CLASSES = {
    "place_recognition_node": ("bevplace_ros.nodes.place_recognition_node", "PlaceRecognitionNode"),
    "registration_node": ("bevplace_ros.nodes.registration_node", "RegistrationNode"),
    "pose_graph_node": ("bevplace_ros.nodes.pose_graph_node", "PoseGraphNode"),
}
# Parameter handling does not depend on trained weights: untrained place weights keep these tests
# independent of the shipped file (tested elsewhere) and fast.
TEST_OVERRIDES = {"place_recognition_node": [Parameter("place.weights", value="random")]}


def _node(name, context, overrides=()):
    module, cls = NODE_CLASSES[name]
    node_cls = getattr(importlib.import_module(module), cls)
    return node_cls(context=context, parameter_overrides=[*TEST_OVERRIDES.get(name, []), *overrides])


def test_yaml_is_the_rendering_of_the_declared_parameters():
    committed = (REPO_ROOT / "config" / "bevplace.yaml").read_text()
    assert committed == config_file.render(), "regenerate: python -m bevplace_ros.nodes.config_file > config/bevplace.yaml"


def test_yaml_values_parse_to_the_declared_types():
    loaded = yaml.safe_load((REPO_ROOT / "config" / "bevplace.yaml").read_text())
    for node, specs in config_file.node_params().items():
        values = loaded[f"/**/{node}"]["ros__parameters"]
        assert set(values) == {s.name for s in specs}
        for spec in specs:
            assert values[spec.name] == spec.default and type(values[spec.name]) is type(spec.default), spec.name


@pytest.mark.parametrize("name", list(NODE_CLASSES))
def test_each_node_declares_exactly_the_yaml_parameters_with_descriptions(ros_context, name):
    node = _node(name, ros_context)
    try:
        declared = set(node._parameters) - {"use_sim_time", "start_type_description_service"}  # rclpy built-ins
        expected = {s.name for s in config_file.node_params()[name]}
        assert declared == expected
        for spec in config_file.node_params()[name]:
            descriptor = node.describe_parameter(spec.name)
            assert descriptor.description.startswith(spec.description)
            if spec.low is not None:
                assert descriptor.integer_range or descriptor.floating_point_range
    finally:
        node.destroy_node()


def test_out_of_range_start_up_value_names_parameter_and_range(ros_context):
    with pytest.raises(InvalidParameter, match=r"retrieval\.top_k.*\[1, 100\]"):
        _node("place_recognition_node", ros_context, [Parameter("retrieval.top_k", value=0)])
    with pytest.raises(InvalidParameter, match=r"graph\.loop_kernel.*one of"):
        _node("pose_graph_node", ros_context, [Parameter("graph.loop_kernel", value="tukey")])


def test_runtime_changes_apply_or_are_refused_with_a_reason(ros_context):
    node = _node("place_recognition_node", ros_context)
    try:
        ok = node.set_parameters([Parameter("retrieval.top_k", value=3)])[0]
        assert ok.successful and node.map.detector.cfg.top_k == 3
        out_of_range = node.set_parameters([Parameter("retrieval.max_descriptor_distance", value=3.0)])[0]
        assert not out_of_range.successful and node.map.detector.cfg.max_descriptor_distance != 3.0
        start_up_only = node.set_parameters([Parameter("bev.range_m", value=40.0)])[0]
        assert not start_up_only.successful and "start-up only" in start_up_only.reason
    finally:
        node.destroy_node()


class _Recorded:
    """Stand-in for launch / launch_ros classes: records what the launch file passes them."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _stand_in_launch_modules(monkeypatch):
    """launch and launch_ros cannot be installed from PyPI here, so the test replaces them with
    recorders; the launch file itself is the real one a ROS 2 install runs."""
    names = {
        "launch": ["LaunchDescription"],
        "launch.actions": ["DeclareLaunchArgument", "SetEnvironmentVariable"],
        "launch.substitutions": ["EnvironmentVariable", "LaunchConfiguration", "PathJoinSubstitution"],
        "launch_ros.actions": ["Node"],
        "launch_ros.substitutions": ["FindPackageShare"],
    }
    for module, classes in names.items():
        stub = types.ModuleType(module)
        for cls in classes:
            setattr(stub, cls, type(cls, (_Recorded,), {}))
        monkeypatch.setitem(sys.modules, module, stub)
    monkeypatch.setitem(sys.modules, "launch_ros", types.ModuleType("launch_ros"))


def test_launch_file_starts_the_installed_executables_with_the_params_file(monkeypatch):
    _stand_in_launch_modules(monkeypatch)
    spec = importlib.util.spec_from_file_location("bevplace_launch", REPO_ROOT / "launch" / "bevplace.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    actions = description.args[0]
    arguments = {a.args[0]: a for a in actions if type(a).__name__ == "DeclareLaunchArgument"}
    assert {"params_file", "points_topic", "odom_topic", "use_sim_time"} <= set(arguments)
    default = arguments["params_file"].kwargs["default_value"].args[0]
    assert [getattr(p, "args", (p,))[0] for p in default][1:] == ["config", "bevplace.yaml"]
    nodes = [a for a in actions if type(a).__name__ == "Node"]
    executables = {n.kwargs["executable"] for n in nodes}
    assert executables == set(NODE_CLASSES)
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text()
    setup_py = ast.unparse(ast.parse((REPO_ROOT / "setup.py").read_text()))
    for exe in executables:
        assert (REPO_ROOT / "scripts" / exe).is_file() and f"scripts/{exe}" in cmake
        assert re.search(rf"{exe} = bevplace_ros\.nodes\.{exe}:main", setup_py)
    yaml_nodes = {key.split("/")[-1] for key in yaml.safe_load((REPO_ROOT / "config" / "bevplace.yaml").read_text())}
    for node in nodes:
        assert node.kwargs["name"] in yaml_nodes
        remapped = {src for src, _ in node.kwargs["remappings"]}
        assert remapped == {"points", "odom"}
        params = node.kwargs["parameters"]
        assert type(params[0]).__name__ == "LaunchConfiguration" and params[0].args[0] == "params_file"
        assert "use_sim_time" in params[1]
    # the nodes get the large-cloud Fast DDS profile unless the environment names the user's own
    (profile,) = [a for a in actions if type(a).__name__ == "SetEnvironmentVariable"]
    assert actions.index(profile) < actions.index(nodes[0])
    assert profile.args[0] == "FASTDDS_DEFAULT_PROFILES_FILE" and profile.args[1].args[0] == "dds_profile"
    users = arguments["dds_profile"].kwargs["default_value"]
    assert users.args[0] == "FASTDDS_DEFAULT_PROFILES_FILE"
    deprecated = users.kwargs["default_value"]
    assert deprecated.args[0] == "FASTRTPS_DEFAULT_PROFILES_FILE"
    shipped = deprecated.kwargs["default_value"].args[0]
    assert [getattr(p, "args", (p,))[0] for p in shipped][1:] == ["config", "fastdds_large_clouds.xml"]
    assert re.search(r"install\(DIRECTORY launch config ", cmake)


def test_large_cloud_profile_sizes_shared_memory_and_udp_for_lidar_clouds():
    """Between processes Fast DDS's defaults (512 KiB shared-memory segment) lose 2 MB clouds; the
    profile must hold the sensor-data history (5) of 8 MB clouds and not fall back to the built-ins."""
    import xml.etree.ElementTree as ET

    from bevplace_ros.nodes.runtime import large_cloud_profile

    ns = {"dds": "http://www.eprosima.com"}
    root = ET.parse(large_cloud_profile()).getroot()
    transports = {t.findtext("dds:transport_id", namespaces=ns): t for t in root.iterfind(".//dds:transport_descriptor", ns)}
    kinds = {t.findtext("dds:type", namespaces=ns): t for t in transports.values()}
    assert int(kinds["SHM"].findtext("dds:segment_size", namespaces=ns)) >= 5 * 8 * 2**20
    assert int(kinds["UDPv4"].findtext("dds:receiveBufferSize", namespaces=ns)) >= 8 * 2**20
    participant = root.find(".//dds:participant[@is_default_profile='true']", ns)
    assert participant.findtext(".//dds:useBuiltinTransports", namespaces=ns) == "false"
    assert {t.text for t in participant.iterfind(".//dds:userTransports/dds:transport_id", ns)} == set(transports)


def test_profile_is_set_unless_the_user_configured_the_middleware():
    from bevplace_ros.nodes.runtime import large_cloud_profile, use_large_cloud_profile

    env: dict[str, str] = {}
    use_large_cloud_profile(env)
    assert env == {"FASTDDS_DEFAULT_PROFILES_FILE": str(large_cloud_profile())}
    for users in ({"FASTDDS_DEFAULT_PROFILES_FILE": "/mine.xml"}, {"FASTRTPS_DEFAULT_PROFILES_FILE": "/mine.xml"},
                  {"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"}):
        env = dict(users)
        use_large_cloud_profile(env)
        assert env == users
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    assert "config/fastdds_large_clouds.xml" in setup  # install/env.sh exports it


def test_place_node_subscribes_to_the_remapped_topics(ros_context):
    node = _node("place_recognition_node", ros_context)
    try:
        topics = {s.topic_name for s in node.subscriptions}
        assert {"/points", "/odom"} <= topics
    finally:
        node.destroy_node()


def test_a_bev_preset_replaces_the_bev_values_the_empty_preset_keeps_them_and_auto_follows_the_model(ros_context):
    from bevplace_ros.bev import BEVConfig
    from bevplace_ros.nodes.place_recognition_node import PlaceRecognitionNode

    def node(**overrides):
        params = {"place.weights": "random", "bev.z_min": -3.0, **overrides}
        return PlaceRecognitionNode(context=ros_context, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])

    nodes = {"kitti": node(**{"bev.preset": "bevplace_kitti", "place.model": "bevplace_equivariant"}),
             "own": node(**{"bev.preset": ""}),
             "auto_v1": node(),  # the defaults: the authors' model, auto
             "auto_equivariant": node(**{"place.model": "bevplace_equivariant"})}
    try:
        assert nodes["kitti"].bev_cfg == BEVConfig.preset("bevplace_kitti") == nodes["auto_v1"].bev_cfg
        for name in ("own", "auto_equivariant"):
            assert nodes[name].bev_cfg.z_min == -3.0 and nodes[name].bev_cfg.cells == BEVConfig().cells, name
    finally:
        for n in nodes.values():
            n.destroy_node()


def test_registration_node_hands_its_kiss_retry_to_the_registrar(ros_context):
    from bevplace_ros.commands.evaluate_registration import KISS_RETRY_NAMES
    from bevplace_ros.registration.registrar import KISS_RETRIES, WIDER_RETRY

    assert KISS_RETRY_NAMES == tuple(KISS_RETRIES)  # the commands' --kiss-retry names the registrar's choices

    for value, expected in (("wider", WIDER_RETRY), ("none", None)):
        node = _node("registration_node", ros_context, [Parameter("registration.kiss_retry", value=value)])
        try:
            assert node.verifier.registrar.cfg.kiss_retry == expected
        finally:
            node.destroy_node()
