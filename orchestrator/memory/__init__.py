"""Memory techniques, one module each, applied per layer from the plan.

The registry maps the stable names a plan or job config uses to the module that implements them; MEMO's swap
and recompute are one token-wise split, so both names lead to `tokenwise`. The approximate ones (`quant_int8`,
`quant_int4_deriv`, `wta_crs`) each offer `apply(model, config, layers)`; `compressed` wires them into layers.
"""

from types import ModuleType
from typing import Dict

from spec.errors import ConfigError
from orchestrator.memory import quant_int4_deriv, quant_int8, token_elim, tokenwise, wta_crs

REGISTRY: Dict[str, ModuleType] = {"swap": tokenwise, "recompute": tokenwise, "token_elim": token_elim,
                                   "quant_int8": quant_int8, "quant_int4_deriv": quant_int4_deriv, "wta_crs": wta_crs}


def technique(name: str) -> ModuleType:
    if name not in REGISTRY:
        raise ConfigError(f"memory technique {name!r} is unknown; valid: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
