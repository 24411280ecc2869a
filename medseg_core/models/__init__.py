"""Segmentation models: one registry over MONAI's U-Net family and our TransUNet.

``build_model(name, **kwargs)`` builds any registered model with the shared vocabulary
``spatial_dims, in_channels, out_channels, norm, dp_compatible`` plus its own arguments;
``list_models()`` names them. Importing this package registers every family.
"""

from medseg_core.models import dynunet, transunet, unet_family, vit_family  # noqa: F401  (registration)
from medseg_core.models.dp import check_dp_compatible, dp_problems
from medseg_core.models.dynunet import dynunet_kernels_strides
from medseg_core.models.layers import NORMS
from medseg_core.models.registry import (
    ModelSpec,
    build_model,
    get_model_spec,
    list_models,
    model_spatial_dims,
    register_model,
    tiny_config,
)
from medseg_core.models.transunet import TransUNet

__all__ = [
    "NORMS",
    "ModelSpec",
    "TransUNet",
    "build_model",
    "check_dp_compatible",
    "dp_problems",
    "dynunet_kernels_strides",
    "get_model_spec",
    "list_models",
    "model_spatial_dims",
    "register_model",
    "tiny_config",
]
