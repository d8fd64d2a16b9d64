"""Root conftest: notebooks run cell by cell in file order, whatever reorders the tests.

pytest-randomly (in the ``test`` extra) shuffles test items; an nbval cell item has no
module, so it would mix every notebook's cells together, and a cell depends on the cells
above it in the same kernel.  Tests outside notebooks stay shuffled; the notebooks' cells go
last, each notebook's cells in the order they were collected (file order), notebooks by path.
"""

from __future__ import annotations

import pytest

_ORDER = pytest.StashKey[int]()
_seen = 0


def _is_notebook_cell(item: pytest.Item) -> bool:
    return item.path.suffix == ".ipynb"


def pytest_itemcollected(item: pytest.Item) -> None:
    """Remember the order of collection (a notebook's cells are collected in file order)."""
    global _seen
    item.stash[_ORDER] = _seen
    _seen += 1


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """After any shuffling (pytest-randomly reorders in a wrapper, before the plain hooks)."""
    cells = [it for it in items if _is_notebook_cell(it)]
    if not cells:
        return
    rest = [it for it in items if not _is_notebook_cell(it)]
    cells.sort(key=lambda it: (str(it.path), it.stash.get(_ORDER, 0)))
    items[:] = rest + cells
