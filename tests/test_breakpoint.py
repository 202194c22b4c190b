"""The breakpoint (data.breakpoint): the usable criterion, the choice of N on built figures, the file, and
`upscale` on 4 x 4 and 6 x 6 inputs (refused naming the option, run with the figure quoted)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.data.breakpoint import (
    BREAKPOINT_FILE,
    MIN_BETTER_FRACTION,
    MIN_GAIN_DB,
    Breakpoint,
    SizeFigures,
    breakpoint_of,
    check_acquired_size,
    load_breakpoint,
    write_breakpoint,
)
from ftddm_trt.data.nifti.files import InputError

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()


def fig(n: int, gain: float, better: float = 1.0, gain_hr: float | None = None) -> SizeFigures:
    return SizeFigures(n, {"lr": gain, "hr": gain if gain_hr is None else gain_hr},
                       {"lr": better, "hr": better})


def flat(text: str) -> str:
    return "".join(text.split())


def test_usable_needs_both_protocols_the_gain_and_the_share():
    assert fig(8, MIN_GAIN_DB, MIN_BETTER_FRACTION).usable
    assert not fig(8, MIN_GAIN_DB - 0.01).usable
    assert not fig(8, 3.0, MIN_BETTER_FRACTION - 0.01).usable
    assert not fig(8, 3.0, gain_hr=0.5).usable  # one protocol short is enough to fail


def test_breakpoint_is_the_smallest_n_from_which_every_size_up_is_usable():
    # 4 is usable but 6 is not: the breakpoint cannot lie below a failing size
    figures = [fig(32, 6.0), fig(2, 0.1, 0.4), fig(4, 1.5), fig(6, 0.8), fig(8, 3.0), fig(16, 5.0)]
    bp = breakpoint_of(figures, "built")
    assert bp.n == 8
    assert [f.n for f in bp.figures] == [2, 4, 6, 8, 16, 32]
    assert breakpoint_of([fig(2, 0.1, 0.4), fig(4, 1.5), fig(8, 3.0)], "built").n == 4
    assert breakpoint_of([fig(2, 1.2), fig(4, 1.5)], "built").n == 2
    with pytest.raises(ValueError, match="no usable size"):
        breakpoint_of([fig(4, 2.0), fig(8, 0.2)], "built")


def test_breakpoint_file_round_trip_and_nearest_figures(tmp_path):
    bp = breakpoint_of([fig(2, 0.1, 0.4), fig(4, 1.5), fig(8, 3.0)], "seed 1")
    assert load_breakpoint(tmp_path) is None
    path = write_breakpoint(tmp_path, bp)
    assert path == tmp_path / BREAKPOINT_FILE
    again = load_breakpoint(tmp_path)
    assert again == bp
    assert again.figures_at(4).n == 4 and again.figures_at(6).n == 4  # nearest, the smaller on a tie
    assert again.figures_at(30).n == 8


def test_check_acquired_size(tmp_path):
    bp = breakpoint_of([fig(2, 0.2, 0.5), fig(4, 1.8, 0.95), fig(8, 3.0)], "built")
    assert check_acquired_size(tmp_path, 8, None, set()) == ([], [])  # trained sizes: nothing to say
    with pytest.raises(InputError, match="--accept below-breakpoint") as err:
        check_acquired_size(tmp_path, 2, bp, set())
    assert "breakpoint N = 4" in str(err.value) and "+0.20 dB" in str(err.value)
    accepted, notes = check_acquired_size(tmp_path, 2, bp, {"below-breakpoint"})
    assert accepted[0].startswith("below-breakpoint:") and notes == []
    accepted, notes = check_acquired_size(tmp_path, 4, bp, set())  # at the breakpoint: runs, figure quoted
    assert accepted == [] and "+1.80 dB" in notes[0] and "95%" in notes[0]
    with pytest.raises(InputError, match="no measured breakpoint"):  # nothing measured: refused below 8
        check_acquired_size(tmp_path, 6, None, set())


@pytest.fixture(scope="module")
def small_subjects(tmp_path_factory):
    """One phantom subject acquired at 4 x 4 and at 6 x 6."""
    from ftddm_trt.data.nifti.write import write_phantom_subject
    from ftddm_trt.data.phantom import make_subject

    subject = make_subject(0, seed=0)
    return {n: write_phantom_subject(tmp_path_factory.mktemp(f"n{n}"), subject, n) for n in (4, 6)}


@pytest.fixture(scope="module")
def model_with_breakpoint(tiny_model_dir, tmp_path_factory):
    """The tiny model with a built breakpoint at N = 6."""
    root = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("bp") / "model")
    write_breakpoint(root, Breakpoint(6, (fig(4, 0.4, 0.6), fig(6, 1.3, 0.92)), "built"))
    return root


FAST = ["--sampler", "ftddm-dpmpp", "--ttrunc", "20", "--steps", "2", "--metabolites", "NAA", "--backend", "torch"]


def test_upscale_below_the_breakpoint_is_refused_naming_the_option(small_subjects, model_with_breakpoint, tmp_path):
    out = tmp_path / "sr"
    res = runner.invoke(app, ["upscale", str(small_subjects[4]), "--out", str(out), *FAST,
                              "--model", str(model_with_breakpoint)])
    assert res.exit_code == 2, res.output
    assert flat("below the model's breakpoint N = 6") in flat(res.output)
    assert flat("--accept below-breakpoint") in flat(res.output) and flat("+0.40 dB") in flat(res.output)
    assert not out.exists()


@pytest.mark.slow
def test_upscale_at_and_below_the_breakpoint_when_accepted(small_subjects, model_with_breakpoint, tmp_path):
    out = tmp_path / "sr6"
    res = runner.invoke(app, ["upscale", str(small_subjects[6]), "--out", str(out), *FAST,
                              "--model", str(model_with_breakpoint)])
    assert res.exit_code == 0, res.output
    assert flat("+1.30 dB") in flat(res.output)  # the note quotes the measured figure
    run = json.loads((out / "run.json").read_text())
    assert run["accepted"] == []
    out = tmp_path / "sr4"
    res = runner.invoke(app, ["upscale", str(small_subjects[4]), "--out", str(out), *FAST,
                              "--model", str(model_with_breakpoint), "--accept", "below-breakpoint"])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    assert any(a.startswith("below-breakpoint:") for a in run["accepted"])
