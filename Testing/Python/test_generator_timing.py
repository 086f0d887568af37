"""Generator timing: one row per option set with a time for every mode, a weighted mean between
the fastest and slowest mode, a Markdown table with one line per row, and one-line errors."""
import numpy as np
import pytest

from msdseg.training.generator_timing import OPTION_SETS, main, markdown, time_generator
from msdseg.training.synth import LabelSource
from msdseg.training.trainer import TrainMode

pytestmark = pytest.mark.unit


def _toy_source() -> LabelSource:
    """Cortex around white matter, a lateral ventricle with a temporal horn, a caudate; both sides."""
    lab = np.zeros((40, 40, 40), dtype=np.int32)
    lab[4:36, 4:36, 4:36] = 3
    lab[7:33, 7:33, 7:33] = 2
    lab[20:33, 7:33, 7:33] = 41
    lab[20:33, 4:36, 4:36][lab[20:33, 4:36, 4:36] == 3] = 42
    lab[12:18, 15:25, 15:25] = 4
    lab[13:15, 25:30, 19:21] = 5
    lab[18:20, 15:25, 15:25] = 11
    lab[22:28, 15:25, 15:25] = 43
    aff = np.eye(4)
    aff[:3, 3] = -20.0
    return LabelSource.from_array("toy", lab, aff)


def test_rows_cover_every_option_set_and_mode(tree):
    modes = (TrainMode(4.0, None, 0.5), TrainMode(2.0, (16, 16, 16), 0.5))
    rows = time_generator([_toy_source()], tree, modes, samples=1)
    assert [r["options"] for r in rows] == [name for name, _ in OPTION_SETS]
    for r in rows:
        assert len(r["seconds"]) == 2 and all(s > 0 for s in r["seconds"])
        assert min(r["seconds"]) <= r["weighted"] <= max(r["seconds"])
    table = markdown(rows, modes).splitlines()
    assert len(table) == 2 + len(OPTION_SETS)
    assert "4 mm whole s" in table[0] and "2 mm 16³ crop s" in table[0]


def test_bad_arguments_give_one_line_errors(capsys, tmp_path):
    assert main(["--data", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest not found" in err[0]
    assert main(["--data", str(tmp_path / "missing.json"), "--samples", "0"]) == 2
    assert "--samples" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing.json"), "--modes", "2:x:1"]) == 2
    assert "training mode" in capsys.readouterr().err
