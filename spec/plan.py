"""The plan file: versioned, self-describing YAML that the runtime loads and checks against its job.

Why a hash of the inputs: the runtime never re-plans. A plan made for another model shape, sequence length,
world size, ZeRO stage or profile must be refused with a message saying how to re-plan, so the plan carries
its inputs and a hash of them.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import yaml

from spec.errors import LongtrainError

PLAN_FORMAT = "longtrain-plan"
PLAN_VERSION = 1


class PlanError(LongtrainError):
    """A plan file is missing, malformed, of another version, or made for another job."""


@dataclass
class Plan:
    inputs: Dict[str, Any]
    inputs_hash: str
    layers: List[Dict[str, Any]]
    layout: List[Dict[str, Any]]
    layer_block_layout: List[Dict[str, Any]]
    arena_bytes: int
    lower_bound_bytes: int
    layer_block: Dict[str, Any]
    predicted: Dict[str, Any]
    solver: Dict[str, Any]
    created: str = ""
    runtime_arena: Dict[str, Any] = field(default_factory=dict)
    """The buffers the runtime places in its preallocated arena (today: each layer's kept token-wise share)."""
    format: str = PLAN_FORMAT
    version: int = PLAN_VERSION
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        head = {k: data.pop(k) for k in ("format", "version", "created", "inputs_hash", "inputs")}
        return {**head, **data}


def hash_inputs(inputs: Dict[str, Any]) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def save_plan(plan: Plan, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(plan.to_dict(), sort_keys=False, width=120))
    tmp.replace(path)


def load_plan(path: Path) -> Plan:
    if not Path(path).is_file():
        raise PlanError(f"plan file {path} not found; make one with `longtrain plan CONFIG --out {path}`")
    data = yaml.safe_load(Path(path).read_text()) or {}
    if data.get("format") != PLAN_FORMAT or data.get("version") != PLAN_VERSION:
        raise PlanError(f"plan file {path} is format {data.get('format')!r} version {data.get('version')!r}, "
                        f"expected {PLAN_FORMAT!r} version {PLAN_VERSION}; re-plan with `longtrain plan`")
    try:
        plan = Plan(**data)
    except TypeError as error:
        raise PlanError(f"plan file {path} is malformed ({error}); re-plan with `longtrain plan`") from error
    if hash_inputs(plan.inputs) != plan.inputs_hash:
        raise PlanError(f"plan file {path}: its inputs do not match its inputs_hash (edited by hand?); re-plan "
                        "with `longtrain plan`")
    return plan


def check_plan_matches(plan: Plan, inputs: Dict[str, Any], path: Path) -> None:
    """Refuse a plan made for another job, naming the first input that differs."""
    if plan.inputs_hash == hash_inputs(inputs):
        return
    differing = sorted(k for k in set(plan.inputs) | set(inputs) if plan.inputs.get(k) != inputs.get(k))
    key = differing[0] if differing else "inputs"
    raise PlanError(f"plan {path} was made for {key}={plan.inputs.get(key)!r}, this job has "
                    f"{inputs.get(key)!r}; re-plan with `longtrain plan CONFIG --out {path}`")
