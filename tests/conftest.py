# ==================================================================================================
# Tiny exported model set (serving / Triton tests). Section owned by the Triton worker: other
# fixtures go in their own sections. Session-scoped: the ONNX export with its parity checks takes
# ~30 s on 2 cores, so it is done once per test session and shared.
# ==================================================================================================
import pytest as _pytest_tiny


def build_tiny_model_set(folder, seed: int = 0):
    """Save tiny-preset networks (64 x 64 images) as a model folder (unet, unet_full, flow).

    Every parameter is perturbed so that no zero-initialised layer makes an output trivially zero.
    """
    from pathlib import Path

    import torch

    from ftddm_trt.models import ConditionalFlow, DenoisingUNet, FlowConfig, UNetConfig, save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def perturbed(module, std, s):
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
        return module.eval()

    torch.manual_seed(seed)
    ucfg = UNetConfig.preset("tiny").replace(image_size=64)
    fcfg = FlowConfig.preset("tiny").replace(image_size=64)
    save_model(perturbed(DenoisingUNet(ucfg), 0.05, seed + 1), ucfg, folder / "unet")
    save_model(perturbed(DenoisingUNet(ucfg), 0.05, seed + 2), ucfg, folder / "unet_full")
    save_model(perturbed(ConditionalFlow(fcfg), 0.05, seed + 3), fcfg, folder / "flow")
    return folder


@_pytest_tiny.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A model folder with tiny unet, unet_full and flow networks."""
    return build_tiny_model_set(tmp_path_factory.mktemp("tiny_model") / "model")


@_pytest_tiny.fixture(scope="session")
def tiny_onnx_export(tiny_model_dir, tmp_path_factory):
    """The tiny model set exported by export_model_set (unet.onnx, unet_full.onnx, flow.onnx, manifest)."""
    from ftddm_trt.export.onnx_export import export_model_set
    from ftddm_trt.models.model_set import ModelSet

    out = tmp_path_factory.mktemp("tiny_export") / "onnx"
    export_model_set(ModelSet.open(tiny_model_dir), out, log=lambda _m: None)
    return out


# ========================================================================== end of the tiny export


# ==================================================================================================
# Training / pipeline / export / upscale-CLI tests. Section owned by the test worker of those modules.
# ==================================================================================================


@_pytest_tiny.fixture(scope="session")
def torch_single_thread():
    """One intra-op thread for torch while the session runs (restored afterwards).

    On a small, busy machine torch's default (one thread per core) contends with everything else
    and runs the tiny networks 10-30x slower; results do not depend on the thread count.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("torch_single_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@_pytest_tiny.fixture(scope="session")
def phantom_subject_dir(tmp_path_factory):
    """One phantom subject (sub-000, seed 0) acquired at 16 x 16, in the FSL-MRS layout, with its truth.

    Shared and read-only: tests that corrupt or write files copy it first (``copy_subject``).
    """
    from ftddm_trt.data.nifti.write import write_phantom_subject
    from ftddm_trt.data.phantom import make_subject

    root = tmp_path_factory.mktemp("phantom")
    return write_phantom_subject(root, make_subject(0, seed=0), 16)


@_pytest_tiny.fixture
def subject_copy(phantom_subject_dir, tmp_path):
    """A private copy of ``phantom_subject_dir`` (for tests that corrupt or modify an input)."""
    import shutil

    return shutil.copytree(phantom_subject_dir, tmp_path / "in" / phantom_subject_dir.name)


# ============================================================ end of the training / pipeline section
