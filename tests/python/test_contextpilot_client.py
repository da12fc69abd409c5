"""contextpilotd's `POST /reorder` driven by the HTTP client of the PyPI
package `contextpilot` (pinned in requirements-nodeps.txt), unchanged: an
existing ContextPilot user points it at contextpilotd and gets the same
answers for the batch cases of the reference behaviour."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_client_class():
    """The package's own `server/http_client.py`, loaded without running the
    package's heavy `server/__init__.py` (it needs only `requests`)."""
    package = importlib.util.find_spec("contextpilot")
    assert package is not None and package.submodule_search_locations, "contextpilot is not installed"
    path = Path(list(package.submodule_search_locations)[0]) / "server" / "http_client.py"
    spec = importlib.util.spec_from_file_location("contextpilot_http_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ContextPilotIndexClient


def test_the_reference_client_reorders_through_contextpilotd(daemon):
    client = load_client_class()(daemon.root, timeout=30)

    # Strings: the shared blocks come first in first-appearance order, and
    # contexts sharing them are scheduled together.
    reordered, order = client.reorder(
        [["G", "A", "F", "B", "E", "C"], ["X", "Y", "Z", "W", "V", "U"], ["C", "D", "A", "H", "B", "I"]]
    )
    assert order == [0, 2, 1]
    assert reordered == [["A", "B", "C", "G", "F", "E"], ["A", "B", "C", "D", "H", "I"], ["X", "Y", "Z", "W", "V", "U"]]

    # Integers, and the first-appearance prefix order.
    reordered, order = client.reorder([[5, 1, 9, 2], [2, 7, 1, 5], [8, 3, 4]])
    assert [reordered[order.index(i)] for i in range(3)] == [[1, 2, 5, 9], [1, 2, 5, 7], [8, 3, 4]]
    reordered, _ = client.reorder([["C", "A", "D", "B"], ["B", "E", "A", "C"]])
    assert reordered == [["C", "A", "B", "D"], ["C", "A", "B", "E"]]

    raw = client.reorder_raw([[1, 2, 3, 100, 101], [1, 2, 3, 102, 103], [10, 20, 30, 200, 201]])
    assert raw["mode"] == "stateless"
    assert raw["num_contexts"] == 3
    assert [g[1] for g in raw["groups"]] == [[0, 1], [2]]
