"""Selecting particles on a landscape (``deepcryo.landscape.selection``): polygons against points whose side is
known by construction, cluster selection, and the selection file's round trip."""
import numpy as np
import pytest

from deepcryo.core.errors import InputError
from deepcryo.landscape import selection

#: An L-shaped (non-convex) polygon: the unit squares [0,2]x[0,1] and [0,1]x[1,2].
L_SHAPE = np.array([[0, 0], [2, 0], [2, 1], [1, 1], [1, 2], [0, 2]], dtype=float)


def _inside_l_shape(xy):
    x, y = xy[:, 0], xy[:, 1]
    return ((0 < x) & (x < 2) & (0 < y) & (y < 1)) | ((0 < x) & (x < 1) & (0 < y) & (y < 2))


def test_inside_polygon_non_convex():
    """Grid points a quarter step off every edge: inside exactly when inside one of the L's two squares."""
    g = np.arange(-1.0, 3.0, 0.5) + 0.25
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    truth = _inside_l_shape(xy)
    assert 0 < truth.sum() < len(xy)
    np.testing.assert_array_equal(selection.inside_polygon(xy, L_SHAPE), truth)
    np.testing.assert_array_equal(selection.inside_polygon(xy, L_SHAPE[::-1]), truth)   # either orientation


def test_select_by_polygon_returns_ids_inside():
    rng = np.random.default_rng(3)
    xy = rng.uniform(-0.5, 2.5, size=(500, 2))
    ids = np.arange(1000, 1500)
    chosen = selection.select_by_polygon(ids, xy, L_SHAPE)
    assert chosen == [int(i) for i in ids[_inside_l_shape(xy)]]


def test_parse_and_format_polygon():
    vertices = selection.parse_polygon("0 0, 2 0; 2 1  1,1 (1 2) [0 2]")
    np.testing.assert_array_equal(vertices, L_SHAPE)
    np.testing.assert_array_equal(selection.parse_polygon(selection.format_polygon(vertices)), vertices)
    for bad in ("", "0 0, 1 1", "0 0 1 1 2", "a b, 1 1, 2 2"):
        with pytest.raises(InputError):
            selection.parse_polygon(bad)


def test_select_by_clusters():
    ids = [11, 12, 13, 14, 15]
    labels = ["1", "2", "1", "3", "2"]               # STAR columns may come as strings
    assert selection.select_by_clusters(ids, labels, [2, 1]) == [11, 12, 13, 15]
    with pytest.raises(InputError, match="no cluster 4"):
        selection.select_by_clusters(ids, labels, [4])


def test_embedding_xy():
    columns = {"dcPC1": ["1.5", "2"], "dcPC2": [3, 4]}
    np.testing.assert_array_equal(selection.embedding_xy(columns, "PCA"), [[1.5, 3], [2, 4]])
    with pytest.raises(InputError, match="no UMAP"):
        selection.embedding_xy(columns, "UMAP")


def test_selection_file_round_trip(tmp_path):
    path = str(tmp_path / "sel.txt")
    selection.write_selection(path, [5, 3, 9], "UMAP", L_SHAPE)
    ids, header = selection.read_selection(path)
    assert ids == [5, 3, 9] and header["embedding"] == "UMAP"
    np.testing.assert_array_equal(selection.parse_polygon(header["polygon"]), L_SHAPE)
    (tmp_path / "bad.txt").write_text("# nothing\n1\nx\n")
    with pytest.raises(InputError, match="line 3"):
        selection.read_selection(str(tmp_path / "bad.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InputError, match="no particle id"):
        selection.read_selection(str(tmp_path / "empty.txt"))
