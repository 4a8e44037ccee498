"""`longtrain config show` (the resolved job, every default written out) and `longtrain config diff A B`.

Why: a job is a YAML file plus overrides plus defaults; before spending GPU hours a user wants to see what will
run, and after two runs behave differently, which keys differ. A run directory's `config.yaml` is the resolved
job it ran (the newest one when it was resumed), so `diff` takes run directories and config files alike.
"""

from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from spec.config import job_to_yaml, load_job_config
from spec.errors import ConfigError


def run_config_show(config_path, overrides: Sequence[str]) -> int:
    print(job_to_yaml(load_job_config(config_path, overrides)), end="")
    return 0


def run_config_diff(first: str, second: str) -> int:
    """Print `key: A -> B` for each key whose resolved value differs (exit 0 either way; `same` when none)."""
    a, b = _resolved(first), _resolved(second)
    lines = diff_lines(a, b)
    print(f"--- {first}\n+++ {second}")
    print("\n".join(lines) if lines else "same resolved config")
    return 0


def diff_lines(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    flat_a, flat_b = _flatten(a), _flatten(b)
    missing = "(absent)"
    return [f"{key}: {_text(flat_a.get(key, missing))} -> {_text(flat_b.get(key, missing))}"
            for key in sorted(set(flat_a) | set(flat_b)) if flat_a.get(key, missing) != flat_b.get(key, missing)]


def _resolved(spec: str) -> Dict[str, Any]:
    """A run directory's newest config*.yaml as written, or a config file (name) resolved with its defaults."""
    path = Path(spec)
    if path.is_dir():
        written = run_config(path)
        if written is None:
            raise ConfigError(f"{spec} is a directory without config.yaml; give a run directory or a config file")
        return written
    return asdict(load_job_config(spec, []))


def run_config(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The newest resolved config a run wrote (config.yaml, then config.STAMP.yaml per resume); None if none."""
    written = sorted(Path(run_dir).glob("config*.yaml"), key=lambda p: (p.name != "config.yaml", p.name))
    if not written:
        return None
    try:
        return yaml.safe_load(written[-1].read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{written[-1]} is not YAML ({' '.join(str(error).split())})") from error


def keys_help(width: int = 110) -> str:
    """Every config key with its schema default, one wrapped paragraph per section (for `--help`): generated from
    `spec.config.schema`, so it cannot drift from what the loader accepts."""
    import textwrap

    from spec.config import JobConfig

    choices = key_choices()
    paragraphs = ["config keys (key=default {choices}; `longtrain config show` resolves a file; README 'Config "
                  "reference' explains each):"]
    for section, values in asdict(JobConfig()).items():
        if not isinstance(values, dict):
            paragraphs.append(f"  {section}={_text(values)}")
            continue
        items = " ".join(f"{key}={_text(value)}" + _choices_text(choices.get(f"{section}.{key}"))
                         for key, value in _flatten(values).items())
        paragraphs.append(textwrap.fill(items, width, initial_indent=f"  {section}: ", subsequent_indent="    ",
                                        break_on_hyphens=False))
    return "\n".join(paragraphs)


def key_choices() -> Dict[str, Tuple[str, ...]]:
    """The keys that take one of a few values, with those values (the schema's own tuples), for `--help`;
    tests/test_cli_operator.py keeps this equal to what the config's validation accepts."""
    from spec.config import schema
    from spec.config.presets import MODEL_PRESETS

    return {"model.preset": tuple(MODEL_PRESETS), "model.architecture": schema.ARCHITECTURES,
            "model.rope_scaling.type": schema.ROPE_SCALING_TYPES, "data.source": schema.DATA_SOURCES,
            "data.token_dtype": schema.TOKEN_DTYPES, "data.packing": schema.PACKINGS,
            "data.document_attention": schema.DOCUMENT_ATTENTION, "train.precision": schema.PRECISIONS,
            "train.activation_checkpointing": schema.ACTIVATION_CHECKPOINTING, "train.elementwise": schema.ELEMENTWISE,
            "train.attention_kernel": schema.ATTENTION_KERNELS, "train.allocator": schema.ALLOCATORS,
            "train.on_nonfinite": schema.ON_NONFINITE, "cluster.placement_strategy": schema.PLACEMENT_STRATEGIES,
            "compression.linear_inputs": ("none", "int8"), "compression.norm_inputs": ("none", "int8"),
            "compression.silu": ("none", "int8", "int4"), "eval.filler": schema.EVAL_FILLERS,
            "metrics.trackers": schema.TRACKERS}


def _choices_text(choices: Optional[Tuple[str, ...]]) -> str:
    return "{" + "|".join(choices) + "}" if choices else ""


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _text(value: Any) -> str:
    return value if value == "(absent)" else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix(
        "\n...").removesuffix(" ...")
