"""The typer application every command module registers on, and its one option of its own, --version."""

import typer

from ftddm_trt import __version__
from ftddm_trt.cli.command import Group

app = typer.Typer(
    name="ftddm-trt",
    help="FTDDM MRSI super-resolution: phantoms, training, ONNX/TensorRT export, Triton serving, upscaling.",
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ftddm-trt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, show_default=False,
        help="Print the version of ftddm-trt and exit.",
    ),
) -> None:
    pass
