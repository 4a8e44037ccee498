"""A Hugging Face model's `config.json` as longtrain's model shape, and back (torch-free).

Why: the job most users bring is a published Llama-family checkpoint to extend or fine-tune. Its `config.json` is
the one true statement of its shape and RoPE: a shape restated by hand can be wrong in a way the weights do not
reveal (a wrong `rope_theta` or ignored Llama-3.1 `rope_scaling` loads without complaint and computes other
logits). So `model.init_from=HF_DIR` makes config.json a layer of the job (below the YAML file and the overrides,
checked against them), anything longtrain's model would compute differently is refused in one line, and
`longtrain export` writes the same keys back. Context extension is a config change on top (`model.rope_theta`,
`model.rope_scaling.*`, `model.max_position_embeddings`): the only keys a job may set differently, stated in the
run header (`extension`). Both config.json forms are read: transformers 4's `rope_theta` + `rope_scaling` and
transformers 5's `rope_parameters`; both are written.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from spec.config.presets import MODEL_PRESETS
from spec.config.schema import RopeScalingConfig
from spec.errors import ConfigError

CONFIG_FILE = "config.json"
HF_PRESET = "hf"
"""model.preset when config.json gives the shape (written into the run's config.yaml)."""
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""model.architecture -> the Hugging Face class; its model_type is the key."""
SUPPORTED = "LlamaForCausalLM, MistralForCausalLM without a sliding window or Qwen2ForCausalLM"
EXTENSION_KEYS = ("rope_theta", "rope_scaling", "max_position_embeddings")
"""Keys a job may set differently from config.json: how it extends the context."""
HF_KEYS = {"architecture": "architectures", "vocab_size": "vocab_size", "hidden_size": "hidden_size",
           "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "num_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size",
           "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
           "max_position_embeddings": "max_position_embeddings", "rope_scaling": "rope_scaling"}
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn", "dynamic": "dynamic"}
_SCALING_KEYS = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
                 "beta_slow", "attention_factor", "truncate")
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768}
"""transformers' class defaults, for a config.json that leaves the key out."""


def config_file(init_from: Optional[str]) -> Optional[Path]:
    """config.json of model.init_from when it names a Hugging Face model directory that has one."""
    if not init_from:
        return None
    file = Path(init_from) / CONFIG_FILE
    return file if file.is_file() else None


def read_config(file: Path) -> Dict[str, Any]:
    try:
        content = json.loads(Path(file).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"{file} is not valid JSON ({error}); download the model's config.json again") from error
    if not isinstance(content, dict):
        raise ConfigError(f"{file} holds a {type(content).__name__}, not a JSON object; download it again")
    return content


def model_fields(hf: Dict[str, Any], file: Path) -> Dict[str, Any]:
    """ModelConfig fields from a config.json; what longtrain's model would compute differently is refused."""
    architecture = _architecture(hf, file)
    _refuse_unsupported(hf, architecture, file)
    theta, scaling = _rope(hf, architecture, file)
    heads = _required(hf, "num_attention_heads", file)
    return {"architecture": architecture, "vocab_size": _required(hf, "vocab_size", file),
            "hidden_size": _required(hf, "hidden_size", file), "num_layers": _required(hf, "num_hidden_layers", file),
            "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads,
            "intermediate_size": _required(hf, "intermediate_size", file), "rope_theta": float(theta),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "max_position_embeddings": _max_positions(hf, architecture), "rope_scaling": scaling}


def hf_layer(file_model: Dict[str, Any], override_model: Dict[str, Any], file_label: str) -> Dict[str, Any]:
    """The model fields config.json gives the job (none without model.init_from=HF_DIR), after checking that no
    key the job sets (in the file or on the command line) contradicts them."""
    sections = [(f"in {file_label}", file_model), ("on the command line", override_model)]
    init_from = override_model.get("init_from", file_model.get("init_from"))
    file = config_file(init_from)
    if file is None:
        if any(section.get("preset") == HF_PRESET for _, section in sections):
            raise ConfigError(f"model.preset={HF_PRESET} takes the shape from model.init_from's {CONFIG_FILE}, but "
                              f"model.init_from ({init_from}) is not a Hugging Face model directory with one; set "
                              "model.init_from=HF_DIR or another model.preset")
        return {}
    fields = model_fields(read_config(file), file)
    for label, section in sections:
        _check_section(fields, section, label, file)
    return {**fields, "preset": HF_PRESET}


def _check_section(fields: Dict[str, Any], section: Dict[str, Any], label: str, file: Path) -> None:
    preset = section.get("preset")
    if preset not in (None, HF_PRESET) and preset in MODEL_PRESETS:
        for key, value in MODEL_PRESETS[preset].items():
            if not _same(value, fields[key]):
                raise ConfigError(f"model.preset={preset} ({label}) sets model.{key}={value}, but {file} has "
                                  f"{HF_KEYS[key]}={_hf_value(key, fields[key])}; remove model.preset: with "
                                  f"model.init_from=HF_DIR the shape comes from {CONFIG_FILE}")
    for key, value in section.items():
        if key in fields and key not in EXTENSION_KEYS and not _same(value, fields[key]):
            raise ConfigError(f"model.{key}={value} ({label}) contradicts {file}: {HF_KEYS[key]}="
                              f"{_hf_value(key, fields[key])}; remove model.{key} (the shape comes from "
                              f"{CONFIG_FILE}) or start from a model of that shape")


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(theirs, float) and isinstance(ours, (int, float)) and not isinstance(ours, bool):
        return float(ours) == theirs
    return ours == theirs


def _hf_value(key: str, value: Any) -> Any:
    return ARCHITECTURES[value] if key == "architecture" else value


def _required(hf: Dict[str, Any], key: str, file: Path) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{file} has no positive integer {key} ({value!r}); it is not a complete "
                          f"{SUPPORTED} config: download it again")
    return value


def _architecture(hf: Dict[str, Any], file: Path) -> str:
    names = hf.get("architectures") or []
    by_class = {cls: arch for arch, cls in ARCHITECTURES.items()}
    if len(names) == 1 and names[0] in by_class:
        return by_class[names[0]]
    if not names and hf.get("model_type") in ARCHITECTURES:
        return hf["model_type"]
    what = f"architectures {names}" if names else f"model_type {hf.get('model_type')!r}"
    raise ConfigError(f"model.init_from: {file} has {what}; longtrain runs {SUPPORTED}: start from one of those")


def _refuse_unsupported(hf: Dict[str, Any], architecture: str, file: Path) -> None:
    """One line for the first setting longtrain's model does not compute."""
    for problem in _unsupported(hf, architecture):
        raise ConfigError(f"model.init_from: {file} has {problem}; longtrain runs {SUPPORTED} as published: start "
                          "from a model without it")


def _unsupported(hf: Dict[str, Any], architecture: str) -> List[str]:
    found = []
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        found.append(f"hidden_act={act!r} (longtrain's MLP is SwiGLU with silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            found.append(f"{key}=true ({ARCHITECTURES[architecture]} without biases is what longtrain builds)")
    if architecture == "mistral" and hf.get("sliding_window") is not None:
        found.append(f"sliding_window={hf['sliding_window']} (longtrain attends to the whole sequence; Mistral "
                     "v0.2 and later have none)")
    if architecture == "qwen2" and hf.get("use_sliding_window"):
        found.append("use_sliding_window=true (longtrain attends to the whole sequence)")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        found.append(f"layer_types {sorted(layer_types)} (longtrain attends to the whole sequence in every layer)")
    heads, hidden = hf.get("num_attention_heads"), hf.get("hidden_size")
    if hf.get("head_dim") and isinstance(heads, int) and heads and hf["head_dim"] != (hidden or 0) // heads:
        found.append(f"head_dim={hf['head_dim']} other than hidden_size / num_attention_heads = {hidden // heads}")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        found.append(f"partial_rotary_factor={hf['partial_rotary_factor']} (longtrain rotates the whole head)")
    return found


def _rope(hf: Dict[str, Any], architecture: str, file: Path) -> Tuple[float, Dict[str, Any]]:
    """rope_theta and model.rope_scaling fields; transformers 5 writes rope_parameters, 4 rope_theta and rope_scaling
    (which wins when both are there, as transformers 5 reads them)."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"model.init_from: {file} has RoPE settings per layer type ({params!r:.80}); longtrain "
                          f"runs one RoPE for every layer ({SUPPORTED})")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"model.init_from: {file} has RoPE type {kind!r}; longtrain computes default, linear, "
                          "llama3 and yarn: start from a model with one of those")
    extra = sorted(k for k in ("mscale", "mscale_all_dim", "short_factor", "long_factor") if params.get(k))
    if extra:
        raise ConfigError(f"model.init_from: {file} has RoPE keys {', '.join(extra)} ({kind}), which longtrain does "
                          "not compute; start from a model without them")
    scaling = {key: params[key] for key in _SCALING_KEYS if params.get(key) is not None}
    if kind in ("llama3", "yarn"):
        scaling.setdefault("original_max_position_embeddings", _max_positions(hf, architecture))
    return theta, {"type": _ROPE_TYPES[kind], **scaling}


def _max_positions(hf: Dict[str, Any], architecture: str) -> int:
    return int(hf.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[architecture])


def rope_scaling_dict(scaling) -> Optional[Dict[str, Any]]:
    """model.rope_scaling as config.json's rope_scaling (None for plain RoPE)."""
    if scaling.type == "none":
        return None
    out: Dict[str, Any] = {"rope_type": scaling.type, "factor": float(scaling.factor)}
    if scaling.type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    if scaling.type == "llama3":
        out.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor)
    if scaling.type == "yarn":
        out.update(beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow)
        if scaling.attention_factor is not None:
            out["attention_factor"] = scaling.attention_factor
        if not scaling.truncate:
            out["truncate"] = False
    return out


def export_config(model, seq_len: int, dtype: str, source: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """config.json for a model trained by longtrain: the source model's (token ids, anything else it says) with
    longtrain's shape, RoPE (any extension included), dtype and a max_position_embeddings of at least seq_len."""
    arch = model.architecture
    out = {k: v for k, v in (source or {}).items() if k not in ("rope_parameters", "rope_scaling", "torch_dtype",
                                                                "dtype", "transformers_version")}
    scaling = rope_scaling_dict(model.rope_scaling)
    out.update({
        "architectures": [ARCHITECTURES[arch]], "model_type": arch, "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size, "intermediate_size": model.intermediate_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads, "head_dim": model.head_dim, "hidden_act": "silu",
        "max_position_embeddings": max(model.max_position_embeddings or 0, seq_len),
        "rms_norm_eps": model.norm_eps, "rope_theta": model.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": model.rope_theta},
        "tie_word_embeddings": model.tie_embeddings, "torch_dtype": dtype, "dtype": dtype,
        "attention_dropout": 0.0, "use_cache": True, **_architecture_keys(model)})
    out.setdefault("initializer_range", model.init_std)
    return out


def _architecture_keys(model) -> Dict[str, Any]:
    if model.architecture == "llama":
        return {"attention_bias": False, "mlp_bias": False}
    if model.architecture == "mistral":
        return {"sliding_window": None}
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": model.num_layers,
            "layer_types": ["full_attention"] * model.num_layers}


def extension(model, init_from: Optional[str]) -> Optional[str]:
    """What the job changes in the source model's RoPE and context ('rope_theta 500000 -> 8e+06, ...'), or None."""
    file = config_file(init_from)
    if file is None:
        return None
    source = model_fields(read_config(file), file)
    changes = []
    if not _same(model.rope_theta, source["rope_theta"]):
        changes.append(f"rope_theta {source['rope_theta']:g} -> {model.rope_theta:g}")
    if model.rope_scaling != RopeScalingConfig(**source["rope_scaling"]):
        changes.append(f"rope_scaling {rope_scaling_text(RopeScalingConfig(**source['rope_scaling']))} -> "
                       f"{rope_scaling_text(model.rope_scaling)}")
    if model.max_position_embeddings != source["max_position_embeddings"]:
        changes.append(f"max_position_embeddings {source['max_position_embeddings']} -> "
                       f"{model.max_position_embeddings}")
    return ", ".join(changes) or None


def rope_scaling_text(scaling) -> str:
    """'none', 'linear x4', 'yarn x4 from 8192'."""
    if scaling.type == "none":
        return "none"
    base = f" from {scaling.original_max_position_embeddings}" if scaling.type in ("llama3", "yarn") else ""
    return f"{scaling.type} x{scaling.factor:g}{base}"
