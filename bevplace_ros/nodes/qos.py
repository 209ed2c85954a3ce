"""QoS of the keyframes topic, the one every other node builds on."""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

# Reliable, and kept for subscribers that join late: `ros2 launch` starts the three nodes at once and
# discovery takes a while on a busy machine, so the registration and pose-graph nodes may match the
# place node after its first keyframes; without them every loop to those keyframes fails and the pose
# graph misses the start of its chain. 100 keyframes of 0.4 m-voxel clouds: a few tens of MB at most.
KEYFRAMES_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
