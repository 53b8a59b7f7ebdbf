import h5py
import numpy as np
import pytest

from bnprobe.errors import BnprobeError
from bnprobe.schema import open_h5
from bnprobe.store import append_rows, atomic_h5, write_array


def test_append_and_update_in_place_atomically(tmp_path):
    path = tmp_path / "t.h5"
    with atomic_h5(path) as f:
        append_rows(f.require_group("g"), "x", np.arange(6.0).reshape(3, 2), units="1")
    with atomic_h5(path, update=True) as f:
        append_rows(f["g"], "x", np.ones((2, 2)))
        write_array(f, "w", np.arange(1000))
    with h5py.File(path, "r") as f:
        assert f["g/x"].shape == (5, 2) and f["g/x"].attrs["units"] == "1"
        assert f["g/x"].compression == "gzip" and f["g/x"].chunks is not None
        assert f["w"][-1] == 999


def test_a_failed_update_leaves_the_previous_file(tmp_path):
    path = tmp_path / "t.h5"
    with atomic_h5(path) as f:
        write_array(f, "a", np.arange(3))
    with pytest.raises(RuntimeError):
        with atomic_h5(path, update=True) as f:
            write_array(f, "a", np.arange(10))
            raise RuntimeError("killed mid-write")
    with h5py.File(path, "r") as f:
        assert f["a"].shape == (3,)
    assert [p.name for p in tmp_path.iterdir()] == ["t.h5"]


def test_open_h5_errors(tmp_path):
    with pytest.raises(BnprobeError, match="no such file"):
        open_h5(tmp_path / "missing.h5")
    (tmp_path / "bad.h5").write_text("not hdf5")
    with pytest.raises(BnprobeError, match="not a readable HDF5 file"):
        open_h5(tmp_path / "bad.h5")


def test_many_strings_are_stored_uncompressed(tmp_path):
    # variable-length strings take no filters: a deep model's 465 parameter names once crashed h5py's writer
    names = [f"layer3.{i}.bn3.bias" for i in range(465)]
    with atomic_h5(tmp_path / "n.h5") as f:
        write_array(f, "name", names)
    with h5py.File(tmp_path / "n.h5", "r") as f:
        assert list(f["name"].asstr()[:]) == names
