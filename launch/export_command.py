"""`longtrain export RUN_DIR[:TAG] OUT_DIR [--dtype bf16|fp32] [--overwrite]`: a run's checkpoint as a Hugging Face
model directory (the work is orchestrator/checkpoint/export.py; this prints what was written)."""


def run_export(source: str, out_dir: str, dtype: str, overwrite: bool, lora: str = "adapter") -> int:
    from orchestrator.checkpoint.export import export_run  # torch and DeepSpeed: imported only for this command

    result = export_run(source, out_dir, dtype, overwrite, lora=lora)
    copied = (f"; from {result.source}: {', '.join(result.copied)}" if result.copied else
              "; no tokenizer (the run did not start from a Hugging Face directory that has one)")
    print(f"exported {result.tag_dir} (ZeRO-{result.zero_stage}, {result.world_size} rank(s)) in "
          f"{result.seconds:.1f} s\n"
          f"  -> {result.out_dir}: {_class(result.architecture) if result.form == 'model' else result.form}, "
          f"{result.shards} shard(s), "
          f"{_size(result.total_bytes)} {dtype}{copied}")
    return 0


def _class(architecture: str) -> str:
    from spec.config.hf import ARCHITECTURES

    return ARCHITECTURES[architecture]


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"
