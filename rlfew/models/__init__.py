"""Model layer: family adapters (flow transformers incl. FLUX, VP UNets) and role-named networks over diffusers."""

from rlfew.models.base import Conditioning, FamilyAdapter, Prediction, add_noise, tokens_to_map
from rlfew.models.flow import FlowAdapter
from rlfew.models.flux import FluxAdapter
from rlfew.models.loading import DTYPES, load_pipeline, make_adapter, resolve_source
from rlfew.models.roles import ModelRoles, Role, add_lora, build_roles
from rlfew.models.vp import VPAdapter

__all__ = [
    "Conditioning", "DTYPES", "FamilyAdapter", "FlowAdapter", "FluxAdapter", "ModelRoles", "Prediction", "Role",
    "VPAdapter",
    "add_lora", "add_noise", "build_roles", "load_pipeline", "make_adapter", "resolve_source",
]
