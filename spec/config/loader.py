"""Load a job: schema defaults <- model preset <- model.init_from's config.json <- YAML file <- `key=value` overrides,
then validate.

Why one function: every entry point (train, plan, submit, tests) must see the same merged, validated config,
and every way it can be wrong must surface as one `ConfigError` line naming the dotted key.
"""

from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spec.config.hf import HF_PRESET, hf_layer
from spec.config.presets import MODEL_PRESETS
from spec.config.schema import JobConfig
from spec.errors import ConfigError
from spec.resources import CONFIGS_DIR
from spec.yamlio import read_yaml

DEFAULT_CONFIG = CONFIGS_DIR / "default.yaml"


def load_job_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> JobConfig:
    """The validated job for a YAML file (default: configs/default.yaml) and command-line overrides."""
    merged = merge_job_config(path, overrides)
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _config_error(error) from error


def merge_job_config(path: Optional[str], overrides: Sequence[str]) -> DictConfig:
    config_path = resolve_config_path(path)
    file_layer = _read_yaml(config_path)
    override_layer = _parse_overrides(overrides)
    preset_layer = OmegaConf.create({"model": _preset_fields(file_layer, override_layer)})
    hf_model = hf_layer(_model_section(file_layer), _model_section(override_layer), f"config file {config_path}")
    try:
        return OmegaConf.merge(OmegaConf.structured(JobConfig), preset_layer, OmegaConf.create({"model": hf_model}),
                               file_layer, override_layer)
    except OmegaConfBaseException as error:
        raise _config_error(error) from error


def job_to_yaml(job: JobConfig) -> str:
    """The resolved job as YAML, written into every run directory so a run documents itself."""
    return yaml.safe_dump(asdict(job), sort_keys=False)


def resolve_config_path(path: Optional[str]) -> Path:
    """The YAML file for a config argument: an existing file; else a shipped config named bare or as
    `configs/NAME.yaml` (`.yaml` optional), so an installed package runs its shipped configs from any folder."""
    if not path:
        return DEFAULT_CONFIG
    given = Path(path)
    if given.is_file() or given.parent not in (Path("."), Path("configs")):
        return given
    shipped = CONFIGS_DIR / (given.name if given.suffix else f"{given.name}.yaml")
    return shipped if shipped.is_file() else given


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in CONFIGS_DIR.glob("*.yaml")))
        raise ConfigError(f"config file {path} not found; pass an existing YAML file (shipped in "
                          f"{CONFIGS_DIR}: {shipped})")
    content = read_yaml(path, "config file", ConfigError, "fix the syntax") or {}
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...), "
                          f"not a {type(content).__name__}")
    return OmegaConf.create(_checked_sections(content, f"config file {path}"))


def _checked_sections(content: dict, source: str) -> dict:
    """The file's (or the overrides') sections, each a mapping (an empty `model:` is dropped); a section written as
    a list or a scalar is one line naming it (OmegaConf's own message for it is a traceback or a type name)."""
    sections = {f.name for f in fields(JobConfig) if is_dataclass(f.type)}
    for key, value in list(content.items()):
        if key in sections and value is None:
            del content[key]
        elif key in sections and not isinstance(value, dict):
            how = (f"set its keys, e.g. {key}.KEY=VALUE" if source == "overrides" else
                   f"write '{key}:' and its 'key: value' lines indented below it")
            raise ConfigError(f"{source}: {key} is a section, not a {_KINDS.get(type(value), type(value).__name__)} "
                              f"({value!r:.40}); {how}")
    return content


_KINDS = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must be KEY=VALUE with a dotted key, e.g. "
                              "model.num_layers=4")
        if item.strip() == "resume=":  # an empty value is null, which would silently start a fresh run
            raise ConfigError("resume= is empty: pass resume=auto, resume=RUN_DIR, resume=RUN_DIR:TAG or "
                              "resume=CHECKPOINT_DIR[:TAG], or leave resume out to start a new run")
    try:
        layer = OmegaConf.from_dotlist(list(overrides))
        return OmegaConf.create(_checked_sections(OmegaConf.to_container(layer), "overrides"))
    except (OmegaConfBaseException, yaml.YAMLError) as error:  # a value is parsed as YAML (`k={a: 1}`)
        why = (f"{error.problem} (a value is read as YAML: write {{key: value}} with a space after each ':')"
               if isinstance(error, yaml.YAMLError) and getattr(error, "problem", None) else _first_line(error))
        raise ConfigError(f"overrides {' '.join(overrides)!r} cannot be parsed: {why}") from error


def _preset_fields(file_layer: DictConfig, override_layer: DictConfig) -> dict:
    name = OmegaConf.select(override_layer, "model.preset",
                            default=OmegaConf.select(file_layer, "model.preset", default="debug"))
    if name == HF_PRESET:
        return {}  # the shape comes from model.init_from's config.json (hf_layer)
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset ({name!r}) is not a known preset; choose one of "
                          f"{', '.join(MODEL_PRESETS)} or set the shape keys yourself")
    return MODEL_PRESETS[name]


def _model_section(layer: DictConfig) -> dict:
    section = OmegaConf.select(layer, "model", default=None)
    return OmegaConf.to_container(section) if isinstance(section, DictConfig) else {}


def _config_error(error: OmegaConfBaseException) -> ConfigError:
    key = getattr(error, "full_key", None) or getattr(error, "key", None) or "config"
    message = _first_line(error)
    if "not in" in message:
        return ConfigError(f"{key}: unknown key ({message}); check the spelling against the README's "
                           "config reference")
    return ConfigError(f"{key}: {message}; fix the value in the YAML file or the override")


def _first_line(error: Exception) -> str:
    text = getattr(error, "msg", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def list_shipped_configs() -> List[Path]:
    return sorted(CONFIGS_DIR.glob("*.yaml"))
