"""`longtrain eval MODEL [MODEL ...] [CONFIG.yaml] [key=value ...] [--out DIR]`: perplexity by position and passkey
retrieval of one or more models (the work is orchestrator/eval/; this sorts the arguments, checks everything
before loading anything, prints the tables and says where the files are)."""

import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from spec.config import JobConfig, load_job_config
from spec.config.schema import TEXT_SOURCES
from spec.errors import ConfigError


def run_eval(args: Sequence[str], out: Optional[str], device_name: Optional[str] = None) -> int:
    models, config, overrides = split_args(args)
    job = load_job_config(config, overrides)
    if job.data.source in TEXT_SOURCES:
        from launch.prepare_command import ensure_prepared

        job.data.prepared = str(ensure_prepared(job).directory)
    import torch  # torch and the model: imported only for this command

    from orchestrator.eval.models import resolve_models
    from orchestrator.eval.report import passkey_table, perplexity_table, write_all
    from orchestrator.eval.run import check_lengths, check_memory, evaluate, longest_length, resolve_lengths

    resolved = resolve_models(models, job)
    resolve_lengths(resolved, job)
    check_lengths(resolved, job)
    target = output_dir(out, models)
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if job.train.attention_kernel == "auto":  # the profile's pick, refused here if it cannot run
        from orchestrator import attention
        from orchestrator.trainer import profile_name
        from spec.hardware import load_profile

        job = attention.resolved_kernel(job, load_profile(profile_name(job, device.type == "cuda")), device, dtype)
    check_memory(resolved, job, device, dtype)
    started, results = time.time(), []
    for model in resolved:
        results.append(evaluate(model, job, device, dtype))
        r = results[-1]
        print(f"{r.label}: load {r.seconds['load']:.1f} s, perplexity {r.seconds['perplexity']:.1f} s, passkey "
              f"{r.seconds['passkey']:.1f} s, peak memory {r.peak_memory_gib:.2f} GiB "
              f"({'GPU allocator' if device.type == 'cuda' else 'host RSS'}; the forward at "
              f"{longest_length(job)} tokens predicted {r.predicted_peak_gib:.2f} GiB)")
    print("\nmean loss by position (nats; perplexity in brackets)\n" + perplexity_table(results))
    for r in results:
        print("\n" + passkey_table(r))
    settings = {"models": list(models), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                "length": job.eval.length or job.data.seq_len, **vars_of(job)}
    files = write_all(target, results, settings)
    print(f"\nwrote {', '.join(str(f) for f in files)} in {time.time() - started:.1f} s")
    return 0


def split_args(args: Sequence[str]) -> Tuple[List[str], Optional[str], List[str]]:
    """MODEL... [CONFIG.yaml] [key=value ...]: overrides hold '=', the config ends in .yaml/.yml, the rest are models."""
    overrides = [a for a in args if "=" in a]
    configs = [a for a in args if "=" not in a and a.endswith((".yaml", ".yml"))]
    models = [a for a in args if a not in overrides and a not in configs]
    if not models:
        raise ConfigError("eval: no MODEL given; pass a run directory, RUN_DIR:TAG or a Hugging Face directory")
    if len(configs) > 1:
        raise ConfigError(f"eval: two config files ({configs[0]}, {configs[1]}); pass one")
    return models, (configs[0] if configs else None), overrides


def output_dir(out: Optional[str], models: Sequence[str]) -> Path:
    """--out, else RUN_DIR/eval of the first model when it is a run, else ./eval/NAME; refused if it is a file."""
    first = Path(models[0].partition(":")[0])
    target = Path(out) if out else (first / "eval" if (first / "config.yaml").is_file() else Path("eval") / first.name)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"eval: --out {target} is a file; pass a directory")
    return target


def vars_of(job: JobConfig) -> dict:
    from dataclasses import asdict

    return {"eval": asdict(job.eval), "data_source": job.data.source}
