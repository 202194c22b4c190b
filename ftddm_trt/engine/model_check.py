"""One model, end to end: the networks a backend runs must be the weights of the model folder asked for.

Every backend reports the sha256 of the safetensors file each of its networks was made from
(``describe()["models"]``): PyTorch hashes the files it loads, an ONNX export or engine folder records
them in its manifest, a Triton repository records them in each network's ``weights_sha256`` config
parameter. ``check_same_model`` compares them with the model folder's own hashes and refuses a
difference by network name, with both hashes, before any output is made: the fine-mask estimator and
run.json come from the model folder, so networks from another model would mix two models silently.
"""

from __future__ import annotations

from typing import Iterable, Mapping

#: Config parameter (Triton network models and ftddm_sampler) holding the weights' sha256.
WEIGHTS_PARAM = "weights_sha256"


class ModelMismatch(ValueError):
    """A backend runs networks made from other weights than the model folder given."""


def check_same_model(expected: Mapping[str, str], served: Mapping[str, str], networks: Iterable[str],
                     where: str, model: str) -> None:
    """Refuse (ModelMismatch) when a network in ``networks`` of ``where`` was not made from ``model``'s weights.

    ``expected``: network -> sha256 of the model folder's safetensors; ``served``: what ``where`` reports.
    A network ``where`` records no hash for is refused too (it cannot be checked)."""
    problems = []
    for net in networks:
        want = expected.get(net)
        if want is None:
            problems.append(f"{net}: the model {model} has no such network")
            continue
        got = served.get(net) or ""
        if not got:
            problems.append(f"{net}: {where} does not record which weights it was made from "
                            "(regenerate it with this ftddm-trt: `ftddm-trt export` / `triton-repo`)")
        elif got != want:
            problems.append(f"{net}: {where} runs weights sha256 {got}, the model {model} has sha256 {want}")
    if problems:
        raise ModelMismatch("refusing to mix two models: " + "; ".join(problems)
                            + ". Give --model the folder these networks were made from, or serve/export this one.")
