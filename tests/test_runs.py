"""Run directories are never reused and results are written atomically."""
import json

import pytest
import torch

from mechscope.errors import BadInput
from mechscope.runs import new_run_dir, to_json, write_json


def test_new_run_dirs_are_distinct_and_never_reused(tmp_path):
    dirs = [new_run_dir(tmp_path, "patch") for _ in range(5)]
    assert len(set(dirs)) == 5 and all(d.is_dir() and d.parent == tmp_path for d in dirs)
    assert all(d.name.startswith("patch-") for d in dirs)


def test_write_json_is_atomic_and_handles_tensors(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json(path, {"x": torch.tensor([1.5, 2.0]), "n": torch.tensor(3)})
    assert json.loads(path.read_text()) == {"x": [1.5, 2.0], "n": 3}

    def failing_replace(src, dst):  # the process dies between writing the temp file and renaming it
        raise OSError("disk gone")

    monkeypatch.setattr("mechscope.runs.os.replace", failing_replace)
    with pytest.raises(OSError):
        write_json(path, {"n": 4})
    assert json.loads(path.read_text())["n"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_unwritable_out_is_bad_input(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BadInput, match="--out"):
        new_run_dir(blocker / "sub", "patch")


def test_to_json_numpy_and_paths(tmp_path):
    import numpy as np
    assert json.loads(to_json({"a": np.float32(0.5), "p": tmp_path})) == {"a": 0.5, "p": str(tmp_path)}
