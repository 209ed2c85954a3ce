"""Launch the three bevplace_ros nodes on a ROS 2 install.

ros2 launch bevplace_ros bevplace.launch.py points_topic:=/ouster/points odom_topic:=/kiss/odometry

The nodes get the package's Fast DDS profile for LiDAR-size clouds unless FASTDDS_DEFAULT_PROFILES_FILE
(or the deprecated FASTRTPS_DEFAULT_PROFILES_FILE) names one of your own; the LiDAR driver needs it too
(README: middleware).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.substitutions import EnvironmentVariable, LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

NODES = ("place_recognition_node", "registration_node", "pose_graph_node")


def generate_launch_description() -> LaunchDescription:
    arguments = [
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare("bevplace_ros"), "config", "bevplace.yaml"]),
            description="YAML with the parameters of the three nodes",
        ),
        DeclareLaunchArgument("points_topic", default_value="/points", description="sensor_msgs/PointCloud2 input"),
        DeclareLaunchArgument("odom_topic", default_value="/odom", description="nav_msgs/Odometry input"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("namespace", default_value="bevplace", description="namespace of the nodes' own topics"),
        DeclareLaunchArgument(
            "dds_profile",
            default_value=EnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", default_value=EnvironmentVariable(
                "FASTRTPS_DEFAULT_PROFILES_FILE",
                default_value=PathJoinSubstitution([FindPackageShare("bevplace_ros"), "config", "fastdds_large_clouds.xml"]))),
            description="Fast DDS profile (XML) of the nodes: yours if set in the environment, else the package's for large clouds",
        ),
    ]
    profile = SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("dds_profile"))
    parameters = [LaunchConfiguration("params_file"), {"use_sim_time": LaunchConfiguration("use_sim_time")}]
    remappings = [("points", LaunchConfiguration("points_topic")), ("odom", LaunchConfiguration("odom_topic"))]
    nodes = [
        Node(
            package="bevplace_ros",
            executable=name,
            name=name,
            namespace=LaunchConfiguration("namespace"),
            parameters=parameters,
            remappings=remappings,
            output="screen",
        )
        for name in NODES
    ]
    return LaunchDescription([*arguments, profile, *nodes])
