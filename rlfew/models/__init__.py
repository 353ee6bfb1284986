"""Model layer: family adapters (flow transformers incl. FLUX, VP UNets) and role-named networks over diffusers."""

from rlfew.models.base import Conditioning, FamilyAdapter, Prediction, add_noise, tokens_to_map
from rlfew.models.flow import FlowAdapter
from rlfew.models.flux import FluxAdapter
from rlfew.models.loading import DTYPES, load_pipeline, make_adapter, resolve_device, resolve_source
from rlfew.models.roles import Role, Roles, RoleSpec, add_lora, build_roles, merge_role_specs
from rlfew.models.vp import VPAdapter

__all__ = [
    "Conditioning", "DTYPES", "FamilyAdapter", "FlowAdapter", "FluxAdapter", "Prediction", "Role", "RoleSpec",
    "Roles", "VPAdapter",
    "add_lora", "add_noise", "build_roles", "load_pipeline", "make_adapter", "merge_role_specs", "resolve_device",
    "resolve_source", "tokens_to_map",
]
