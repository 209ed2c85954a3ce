"""BEVPlace loop closure for ROS 2: a ROS-free core with thin rclpy nodes on top."""

# The generated interfaces (bevplace_ros.msg / .srv and their typesupport libraries) are
# installed by CMake into a different site-packages than this source tree when it is installed
# with pip; extending __path__ lets one `bevplace_ros` package span both.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
