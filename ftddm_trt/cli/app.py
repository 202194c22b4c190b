"""The typer application every command module registers on."""

import typer

app = typer.Typer(
    name="ftddm-trt",
    help="FTDDM MRSI super-resolution: phantoms, training, ONNX/TensorRT export, Triton serving, upscaling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
