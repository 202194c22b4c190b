"""One vocabulary across the commands: --version, panels, --help-all for expert options, defaults shown,
and the old spellings (options and positional arguments) still accepted with a deprecation line."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

import ftddm_trt
from ftddm_trt.cli.main import app

runner = CliRunner()


def flat(text: str) -> str:
    """``text`` without rich's boxes and line wrapping."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"ftddm-trt {ftddm_trt.__version__}"


def test_commands_are_grouped_in_panels():
    text = runner.invoke(app, ["--help"]).output
    positions = {name: text.index(name) for name in ("Use", "Train", "Deploy", "Measure")}
    assert list(positions) == sorted(positions, key=positions.get)
    assert positions["Use"] < text.index("upscale-cohort") < positions["Train"] < text.index("finetune") \
        < positions["Deploy"] < text.index("triton-repo") < positions["Measure"] < text.index("bench")


def test_expert_options_only_in_help_all():
    short = runner.invoke(app, ["upscale", "--help"])
    full = runner.invoke(app, ["upscale", "--help-all"])
    assert short.exit_code == 0 and full.exit_code == 0
    for option in ("--lambda-min", "--clip-x0", "--sde", "--retry-s", "--data-consistency"):
        assert option not in short.output and option in full.output, option
    assert "--help-all" in short.output and "Expert options" in full.output
    assert "--model" in short.output and "the shipped model" in flat(short.output)


@pytest.mark.parametrize("command", ["upscale", "upscale-cohort", "evaluate", "demo", "phantom", "train", "finetune",
                                     "add-fine-mask", "package-model", "export", "build-engine", "triton-repo",
                                     "verify-repo", "serve", "bench"])
def test_every_option_shows_its_default(command):
    """Every option but --help / --help-all is required or shows a default (a value or what it stands for)."""
    from typer.main import get_command

    root = get_command(app)
    cmd = root.commands[command]
    for param in cmd.params:
        if param.param_type_name != "option":
            continue
        lone_flag_off = param.is_flag and not param.secondary_opts and param.default is False  # shows nothing
        shown = param.required or isinstance(param.show_default, str) or (
            param.show_default and param.default is not None and not lone_flag_off and param.default != [])
        assert shown, f"{command} {param.opts[0]}"


def test_old_positional_output_still_works_and_says_so(tmp_path):
    out = tmp_path / "ph"
    res = runner.invoke(app, ["phantom", str(out), "--subjects", "1", "--n", "8"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "phantoms.json").read_text())["subjects"] == ["sub-000"]
    assert "deprecated" in res.stderr and f"--out {out}" in flat(res.stderr)


def test_old_and_new_spelling_together_is_an_error(tmp_path):
    res = runner.invoke(app, ["phantom", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--subjects", "1"])
    assert res.exit_code == 2 and "give --out once" in flat(res.output)
    res = runner.invoke(app, ["finetune", "--data", str(tmp_path), "--out", str(tmp_path / "m"),
                              "--from", str(tmp_path / "x"), "--model", str(tmp_path / "y")])
    assert res.exit_code == 2 and "--from and --model are two spellings of one option" in flat(res.output)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "m").exists()


def test_old_option_spelling_reaches_the_new_option(tmp_path):
    """finetune's old --from, DATA_DIR and OUT_MODEL land in --model, --data and --out (the refusal names them)."""
    data = tmp_path / "data"
    (data / "sub-000").mkdir(parents=True)
    res = runner.invoke(app, ["finetune", str(data), str(data / "m"), "--from", str(tmp_path / "model"),
                              "--minutes", "1"])
    assert res.exit_code == 2
    text = flat(res.stderr)
    for old, new in (("--from", "--model"), (str(data), f"--data {data}"), (str(data / "m"), f"--out {data / 'm'}")):
        assert f"deprecated: {old}" in text and new in text, (old, new)
    assert "inside" in text and not (data / "m").exists()  # --out inside --data: refused, as when spelled anew
