"""The training loop of one worker: build the model and DeepSpeed engine, resume, step, measure, checkpoint.

Why it knows nothing of Ray: the launcher hands each worker a `WorkerInfo` and a `publish` callback, so the
same loop runs under Ray Train, in a test's process group, or under a plain `deepspeed` launcher.
"""

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from orchestrator.checkpoint import CheckpointManager, CheckpointRef, resume_source
from spec.config import JobConfig
from orchestrator.data import RankSampler, build_windows
from orchestrator.ds_config import deepspeed_config, resolve_precision
from orchestrator import sequence_parallel
from orchestrator import attention, elementwise
from orchestrator.memory import apply_plan, compressed, replay_allocator
from orchestrator.memory.replayed_steps import ReplayedSteps
from orchestrator.metrics import StepMeter
from orchestrator.nonfinite import step_is_usable
from orchestrator.process_group import init_process_group
from orchestrator import lora, memory_snapshot
from orchestrator.build import build_model, initialize_engine
from spec.errors import CheckpointError
from spec.hardware import detect_profile_name, load_profile
from spec.plan import Plan, check_plan_matches, load_plan, plan_inputs


@dataclass
class WorkerInfo:
    rank: int
    world_size: int
    local_rank: int
    node: str


Publish = Callable[[Dict[str, Any]], None]


def train(job: JobConfig, run_dir: Path, worker: WorkerInfo, publish: Publish,
          initial: Optional[CheckpointRef] = None) -> Dict[str, Any]:
    """Train to `job.train.max_steps`, resuming from this run's latest complete checkpoint if there is one."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _log_to_stderr()
    use_cuda = torch.cuda.is_available()
    _set_device_and_threads(worker, use_cuda, job.cluster.cpus_per_worker)
    torch.manual_seed(job.train.seed)  # identical initial weights on every rank
    init_process_group(use_cuda)
    dims = job.parallel_dims()
    sp_group = sequence_parallel.sequence_groups(dims)
    checkpoints = CheckpointManager(run_dir / "checkpoints", job.checkpoint.keep_last, worker.rank, dist.barrier,
                                    trust_pickles=job.checkpoint.trust_pickles, trainable_only=job.model.lora.enabled)
    source = resume_source(checkpoints.dir, initial)
    ds_config = deepspeed_config(job, use_cuda, load_universal=bool(source and source.universal))
    model = build_model(job, use_cuda, ds_config, load_base=source is None or job.model.lora.enabled)
    profile = load_profile(profile_name(job, use_cuda))
    precision = resolve_precision(job.train.precision, use_cuda)
    job = attention.resolved_kernel(job, profile, torch.device("cuda" if use_cuda else "cpu"),
                                    torch.bfloat16 if precision == "bf16" else torch.float32)
    plan = checked_plan(job, profile, precision)
    memory = apply_plan(model, plan, job.compression, job.token_elim, job.train)
    device = torch.device("cuda" if use_cuda else "cpu")
    elementwise.install(model, job.train.elementwise, device)
    attention.install(model, job.train.attention_kernel,
                      job.data.packs_documents and job.data.document_attention == "varlen", device,
                      torch.bfloat16 if precision == "bf16" else torch.float32)
    if sp_group is not None:
        sequence_parallel.install(model, sp_group, split_layers=memory.split_layers)
    engine, _, _, scheduler = initialize_engine(model, ds_config, job.train.offload)
    windows = build_windows(job.data, job.model.vocab_size, job.train.seed)
    sampler = RankSampler(windows, job.data.micro_batch_size, dims.sampler_rank(worker.rank), dims.dp_degree,
                          job.train.seed)
    start_step, rng_restored = _resume(engine, checkpoints, sampler, source, publish if worker.rank == 0 else None,
                                       model)
    if not rng_restored:  # a fresh run, or a rank file that does not apply (another world size, plain DeepSpeed)
        torch.manual_seed(job.train.seed + 1000 * worker.rank + start_step)
    meter = StepMeter(job.model, job.data.seq_len, profile.peak_tflops(precision), worker.rank, worker.node)
    last_step = job.train.stop_at_step or job.train.max_steps
    snapshot = memory_snapshot.Recorder(job.metrics.memory_snapshot_steps, start_step, run_dir, worker.rank)
    replayed = ReplayedSteps(_replay_allocator(job), start_step + 1)
    for step in range(start_step + 1, last_step + 1):
        skipped_before = engine.skipped_steps
        loss = replayed.run(step, lambda: _train_step(engine, sampler, job.train.grad_accum_steps, meter, sp_group))
        reading = meter.stop(step, loss, scheduler.get_last_lr()[0], dims.tokens_per_step_per_rank,
                             swap_host_bytes=memory.host_bytes, grad_norm=_grad_norm(engine),
                             arena_bytes=memory.arena_bytes, arena_fallbacks=memory.step_arena_fallbacks(),
                             replay_bytes=replayed.layout_bytes, replay_fallbacks=replayed.step_fallbacks())
        _publish_step(worker, reading, publish, full_report=_log_due(job, step, start_step))
        snapshot.after_step(step)
        if not step_is_usable(engine, step, loss, skipped_before, job.train.on_nonfinite,
                              publish if worker.rank == 0 else None):
            return {"rank": worker.rank, "start_step": start_step, "final_step": step, "stopped": "nonfinite"}
        if _eval_due(job, step):
            _evaluate(job, engine, windows, dims, worker, step, sp_group, publish)
        if _checkpoint_due(job, step):
            rank_state = {"data": sampler.state()}
            if memory.compressed_layers:
                rank_state["compression"] = compressed.state_dict(model)
            path = _save(checkpoints, engine, step, rank_state)
            if worker.rank == 0:
                publish({"kind": "checkpoint", "step": step, "path": str(path)})
    return {"rank": worker.rank, "start_step": start_step, "final_step": last_step}


def _save(checkpoints: CheckpointManager, engine, step: int, rank_state: Dict[str, Any]) -> Path:
    """This step's checkpoint; a failed write is one line naming the directory and its free space (a full disk
    reaches us from torch.save as a RuntimeError without an errno)."""
    try:
        return checkpoints.save(engine, step, {"step": step, **lora.client_state(engine.module)}, rank_state)
    except (OSError, RuntimeError) as error:
        free_mib = shutil.disk_usage(checkpoints.dir).free / 2**20
        gist = error.strerror if isinstance(error, OSError) and error.strerror else " ".join(str(error).split())
        raise CheckpointError(f"the checkpoint of step {step} could not be written to {checkpoints.dir} ({gist}; "
                              f"{free_mib:.1f} MiB free there)") from error


def _log_to_stderr() -> None:
    """longtrain's own log lines (e.g. each memory technique applied) go to the worker's stderr, which the
    launcher keeps as logs/rank{R}.log."""
    logger = logging.getLogger("longtrain")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _set_device_and_threads(worker: WorkerInfo, use_cuda: bool, cpus_per_worker: int) -> None:
    if use_cuda:
        torch.cuda.set_device(worker.local_rank)
    else:
        torch.set_num_threads(cpus_per_worker)
    os.environ.setdefault("LOCAL_RANK", str(worker.local_rank))


def _replay_allocator(job: JobConfig) -> Optional[replay_allocator.ReplayAllocator]:
    """The replay allocator under train.allocator=planned: installed by the launcher before CUDA's first use in
    this process (`launch.ray_train`), since Ray Train selects the worker's device before the loop starts."""
    if job.train.allocator != "planned":
        return None
    replay = replay_allocator.installed()
    if replay is None:
        raise RuntimeError("train.allocator=planned, but the launcher did not install the replay allocator in this "
                           "worker (orchestrator.memory.replay_allocator.install, before CUDA is first used)")
    return replay


def _resume(engine, checkpoints: CheckpointManager, sampler: RankSampler, source: Optional[CheckpointRef],
            publish: Optional[Publish], model) -> Tuple[int, bool]:
    """(the step to continue after, whether this rank's RNG states were restored: its own rank file applied)."""
    if source is None:
        return 0, False
    state = checkpoints.load(engine, source.tag, Path(source.dir), data_ranks=sampler.world_size)
    sampler.load_state(state["data"])
    if "compression" in state:
        compressed.load_state_dict(model, state["compression"])
    lora.check_resumed(state, model, str(Path(source.dir) / source.tag))
    step = int(state.get("step", engine.global_steps))
    if publish:
        publish({"kind": "resumed", "step": step, "path": str(Path(source.dir) / source.tag)})
    return step, "rng" in state


def profile_name(job: JobConfig, use_cuda: bool) -> str:
    name = job.metrics.hardware_profile
    if name == "auto":
        name = detect_profile_name(torch.cuda.get_device_name() if use_cuda else None)
    return name


def checked_plan(job: JobConfig, profile, precision: str) -> Optional[Plan]:
    """The job's plan file (loaded once per worker), refused in one line if it was made for another job or
    hardware; the driver has checked everything that does not depend on this worker's device."""
    if not job.plan.path:
        return None
    plan = load_plan(Path(job.plan.path))
    check_plan_matches(plan, plan_inputs(job, profile, precision), Path(job.plan.path))
    return plan


def _train_step(engine, sampler: RankSampler, grad_accum_steps: int, meter: StepMeter, sp_group) -> float:
    """One optimizer step (grad_accum_steps micro-batches); starts after a barrier so stragglers show. With
    sequence parallelism each rank feeds its token shard at its global positions; the loss returned is the
    whole sequence's (the mean over the group's shards). Packed documents also bring each row's positions and
    their layout; a shard's mean is then weighted by its share of the predicted tokens (`_shard_weight`)."""
    dist.barrier()
    meter.start()
    total = torch.zeros((), device=engine.device)
    for _ in range(grad_accum_steps):
        batch = sampler.next_micro_batch()
        loss = _micro_batch_loss(engine, batch, sp_group)
        if batch.documents is not None:
            meter.count_documents(batch.documents, 1 if sp_group is None else dist.get_world_size(sp_group))
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    if sp_group is not None:
        dist.all_reduce(total, group=sp_group)
        total /= dist.get_world_size(sp_group)
    return (total / grad_accum_steps).item()


def _micro_batch_loss(engine, batch, sp_group) -> torch.Tensor:
    """This rank's loss on its shard of one micro-batch (weighted by the shard's share of predicted tokens for
    packed documents), as training and the holdout evaluation compute it."""
    inputs, targets = batch.inputs, batch.targets
    shard = sequence_parallel.shard_of(inputs, sp_group)
    if batch.documents is None:
        placement = {"positions": torch.arange(shard.start, shard.stop, device=engine.device)}
    else:
        placement = {"positions": batch.positions[:, shard].to(engine.device), "documents": batch.documents}
    loss = engine(inputs[:, shard].to(engine.device), targets=targets[:, shard].to(engine.device), **placement)
    if batch.documents is not None:
        loss = loss * _shard_weight(targets, shard, sp_group)
    return loss


def _shard_weight(targets: torch.Tensor, shard: slice, sp_group) -> float:
    """What makes the mean over the sp ranks of their shard means the whole sequence's mean when shards predict
    unequal numbers of tokens: shard's predicted tokens x sp / the sequence's (1 without sequence parallelism)."""
    if sp_group is None:
        return 1.0
    predicted = int((targets != -100).sum())
    return int((targets[:, shard] != -100).sum()) * dist.get_world_size(sp_group) / max(predicted, 1)


def _grad_norm(engine) -> Optional[float]:
    """DeepSpeed's global gradient norm of the last step (a float or a tensor by ZeRO stage; None when off)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _eval_due(job: JobConfig, step: int) -> bool:
    every = job.metrics.eval_every_steps
    return bool(every) and (step % every == 0 or step == (job.train.stop_at_step or job.train.max_steps))


def _evaluate(job: JobConfig, engine, windows, dims, worker: WorkerInfo, step: int, sp_group,
              publish: Publish) -> None:
    """The holdout loss of this step's weights, published by rank 0 as an `eval` message."""
    from orchestrator.holdout import holdout_loss

    loss = holdout_loss(engine, windows, job.data.micro_batch_size, dims.sampler_rank(worker.rank), dims.dp_degree,
                        job.train.seed, job.metrics.eval_batches,
                        lambda batch: _micro_batch_loss(engine, batch, sp_group))
    if worker.rank == 0 and loss is not None:
        publish({"kind": "eval", "step": step, "loss": loss, "batches": job.metrics.eval_batches})


def _log_due(job: JobConfig, step: int, start_step: int) -> bool:
    """Log the first step of a (resumed) run, every log_every_steps, and the last step."""
    last = job.train.stop_at_step or job.train.max_steps
    return step == start_step + 1 or step % job.train.log_every_steps == 0 or step == last


def _publish_step(worker: WorkerInfo, reading, publish: Publish, full_report: bool) -> None:
    """Every step: a tick for the progress bar; on log steps: all ranks' readings, gathered on rank 0."""
    if full_report:
        rows = [None] * worker.world_size
        dist.all_gather_object(rows, reading.as_dict())
        if worker.rank == 0:
            publish({"kind": "step", "step": reading.step, "rows": rows})
    elif worker.rank == 0:
        publish({"kind": "tick", "step": reading.step, "loss": reading.loss})


def _checkpoint_due(job: JobConfig, step: int) -> bool:
    every = job.checkpoint.every_steps
    at_end = job.checkpoint.at_end and step == job.train.max_steps
    return bool(every and step % every == 0) or at_end or step == job.train.stop_at_step
