"""The save/load services every node offers for its state, with one behaviour everywhere:
an empty path means the node's default file, and a failed load keeps the in-memory state."""

from __future__ import annotations

from typing import Any, Callable

from bevplace_ros.srv import LoadMap, SaveMap


def serve_save_load(node: Any, suffix: str, default_path: Callable[[], str], save: Callable[[str], str],
                    load: Callable[[str], str], errors: tuple[type[Exception], ...]) -> None:
    """~/save_<suffix> and ~/load_<suffix>; `save`/`load` return what they did, or raise one of `errors`."""

    def on_save(request: SaveMap.Request, response: SaveMap.Response) -> SaveMap.Response:
        path = request.path or default_path()
        try:
            response.message = save(path)
        except (OSError, *errors) as err:
            response.success, response.message = False, f"save failed: {err}"
            return response
        response.success, response.path = True, str(path)
        return response

    def on_load(request: LoadMap.Request, response: LoadMap.Response) -> LoadMap.Response:
        path = request.path or default_path()
        try:
            response.message = load(path)
        except (OSError, *errors) as err:
            response.success, response.message = False, f"kept the current state; load failed: {err}"
            return response
        response.success = True
        return response

    node.create_service(SaveMap, f"~/save_{suffix}", on_save)
    node.create_service(LoadMap, f"~/load_{suffix}", on_load)
