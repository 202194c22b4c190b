"""ftddm_trt.models: the denoising UNet, the conditional flow, the baselines' networks, their configs and
weight files."""

from ftddm_trt.models.config import FlowConfig, UNetConfig
from ftddm_trt.models.flow import ConditionalFlow, FlowReverse, squeeze2d, unsqueeze2d
from ftddm_trt.models.flow_enhancer import EnhancerReverse, FlowEnhancer, FlowEnhancerConfig
from ftddm_trt.models.io import load_config, load_meta, load_model, model_kind, model_sha256, save_model
from ftddm_trt.models.munet import MUNet, MUNetConfig, MUNetCritic
from ftddm_trt.models.unet import DenoisingUNet, count_parameters

__all__ = [
    "UNetConfig",
    "FlowConfig",
    "DenoisingUNet",
    "ConditionalFlow",
    "FlowReverse",
    "MUNetConfig",
    "MUNet",
    "MUNetCritic",
    "FlowEnhancerConfig",
    "FlowEnhancer",
    "EnhancerReverse",
    "squeeze2d",
    "unsqueeze2d",
    "count_parameters",
    "save_model",
    "load_model",
    "load_meta",
    "load_config",
    "model_sha256",
    "model_kind",
]
