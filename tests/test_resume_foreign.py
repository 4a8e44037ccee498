"""Foreign checkpoints: resume from what plain DeepSpeed wrote (no longtrain files, no COMPLETE marker), start from
Hugging Face Llama weights (DeepSpeed ZeRO-3 checkpoint with HF names, safetensors single and sharded), and the
one-line errors of a bad checkpoint, after which the run directory is unchanged.

The checkpoints are written by a small script that calls DeepSpeed directly (`deepspeed.initialize` +
`engine.save_checkpoint`) in one spawned gloo process, which also runs the longtrain runs compared against them."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import spawn_gloo
from spec.config import load_job_config

pytestmark = pytest.mark.slow
BASE = ["cluster.num_workers=1", "train.max_steps=8", "train.log_every_steps=1", "optim.warmup_steps=2",
        "checkpoint.every_steps=0", "data.seq_len=128", "data.micro_batch_size=4", "train.zero_stage=2"]
HF_SEED = 7


def hf_state(model) -> dict:
    """Our model's weights under the names HF's LlamaForCausalLM uses (written out here, not mapped by our code)."""
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not model.config.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        for hf, ours in (("self_attn.q_proj", layer.attn.q_proj), ("self_attn.k_proj", layer.attn.k_proj),
                         ("self_attn.v_proj", layer.attn.v_proj), ("self_attn.o_proj", layer.attn.o_proj),
                         ("mlp.gate_proj", layer.mlp.gate_proj), ("mlp.up_proj", layer.mlp.up_proj),
                         ("mlp.down_proj", layer.mlp.down_proj)):
            state[prefix + hf + ".weight"] = ours.weight
        state[prefix + "input_layernorm.weight"] = layer.attn_norm.weight
        state[prefix + "post_attention_layernorm.weight"] = layer.mlp_norm.weight
    return {k: v.detach().clone() for k, v in state.items()}


def reference_model(*overrides):
    from orchestrator.model import LlamaModel

    torch.manual_seed(HF_SEED)
    return LlamaModel(load_job_config(None, list(overrides)).model)


class _Named(nn.Module):
    """A module whose parameters carry exactly the given dotted names (what another codebase would train)."""

    def __init__(self, state):
        super().__init__()
        for name, tensor in state.items():
            owner = self
            for part in name.split(".")[:-1]:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(name.split(".")[-1], nn.Parameter(tensor.clone()))


def _plain_deepspeed_checkpoints(root: Path, job):
    """What plain DeepSpeed writes: our model trained 4 steps (ZeRO-2, `latest`), HF-named weights (ZeRO-3, no
    `latest`). Same seed, config and batches as longtrain, so the first equals longtrain's own step 4."""
    import deepspeed

    from orchestrator.data import RankSampler, build_windows
    from orchestrator.ds_config import deepspeed_config
    from orchestrator.model import LlamaModel

    torch.manual_seed(job.train.seed)
    model = LlamaModel(job.model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(job, False))
    sampler = RankSampler(build_windows(job.data, job.model.vocab_size, job.train.seed), 4, 0, 1, job.train.seed)
    losses = {}
    for step in range(1, 5):
        inputs, targets = sampler.next_batch()
        loss = engine(inputs, targets=targets)
        engine.backward(loss)
        engine.step()
        losses[step] = [loss.item()]
    engine.save_checkpoint(str(root / "ds_ours"), client_state={"step": 3})  # DeepSpeed's tutorial: 0-based
    hf = _Named(hf_state(reference_model()))
    config = dict(deepspeed_config(job, False), zero_optimization={"stage": 3})
    engine, *_ = deepspeed.initialize(model=hf, model_parameters=hf.parameters(), config=config)
    engine.save_checkpoint(str(root / "ds_hf"), tag="global_step0", save_latest=False)
    return losses


def _runs(rank, world, put, root):
    from orchestrator.checkpoint import check_resume
    from launch.rundir import place_run
    from orchestrator.trainer import WorkerInfo, train

    root = Path(root)
    torch.set_num_threads(1)

    def run(name, *overrides):
        job = load_job_config(None, [*BASE, f"run.root={root / 'runs'}", f"run.name={name}", *overrides])
        placement = place_run(job)
        check_resume(job, placement)
        messages = []
        train(job, placement.run_dir, WorkerInfo(0, 1, 0, "node0"), messages.append, placement.initial)
        put((name, {m["step"]: [r["loss"] for r in m["rows"]] for m in messages if m["kind"] == "step"}))

    put(("plain", _plain_deepspeed_checkpoints(root, load_job_config(None, BASE))))
    run("straight")
    run("foreign", f"resume={root / 'ds_ours'}")
    run("init_hf", "train.max_steps=2", "optim.warmup_steps=1", f"model.init_from={root / 'hf_sharded'}")


def _save_sharded(state: dict, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(directory / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    _save_sharded(hf_state(reference_model()), root / "hf_sharded")
    return root, dict(spawn_gloo(_runs, 1, str(root)))


def test_plain_deepspeed_checkpoint_resumes_bitwise(foreign):
    """Its client state holds `step: 3` (the last data-loader index, as DeepSpeed's tutorial saves it): the step
    count is DeepSpeed's own (4), so the run continues at step 5."""
    _, losses = foreign
    print("straight:", losses["straight"], "\nplain DeepSpeed 1-4:", losses["plain"],
          "\nlongtrain resumed from it 5-8:", losses["foreign"])
    assert sorted(losses["foreign"]) == [5, 6, 7, 8]
    assert {**losses["plain"], **losses["foreign"]} == losses["straight"]


def test_hf_weights_start_training(foreign):
    """Step 1 of a run started from HF safetensors has the loss of the reference model on the same batch."""
    from orchestrator.data import RankSampler, build_windows

    _, losses = foreign
    job = load_job_config(None, BASE)
    sampler = RankSampler(build_windows(job.data, job.model.vocab_size, job.train.seed), 4, 0, 1, job.train.seed)
    inputs, targets = sampler.next_batch()
    torch.set_num_threads(1)
    with torch.no_grad():
        expected = reference_model()(inputs, targets=targets).item()
    print("init_from HF safetensors, step-1 loss:", losses["init_hf"][1][0], "reference model:", expected)
    assert losses["init_hf"][1][0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("source", ["ds_hf:global_step0", "ds_hf/global_step0", "hf_sharded", "single"])
def test_init_from_loads_every_tensor_bitwise(foreign, source):
    from safetensors.torch import save_file

    from orchestrator.checkpoint import check_init_from, load_init_from
    from orchestrator.model import LlamaModel

    root, _ = foreign
    untied = source == "single"  # a separate lm_head.weight, as Llama-2/3 7B-8B have
    overrides = ["model.tie_embeddings=false"] if untied else []
    reference = reference_model(*overrides)
    if untied:
        save_file(hf_state(reference), str(root / "single.safetensors"))
        source = "single.safetensors"
    job = load_job_config(None, [*overrides, f"model.init_from={root / source}"])
    check_init_from(job.model)
    torch.manual_seed(0)
    model = LlamaModel(job.model)
    load_init_from(model, job.model.init_from)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_init_from_another_shape_names_the_tensor(foreign):
    from spec.errors import CheckpointError
    from orchestrator.checkpoint import check_init_from

    root, _ = foreign
    job = load_job_config(None, ["model.intermediate_size=256", f"model.init_from={root / 'hf_sharded'}"])
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight .* has shape \[352, 128\], "
                                              r"this model expects \[256, 128\]"):
        check_init_from(job.model)


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


def _own_run(foreign, tmp_path) -> Path:
    """A copy of the straight run's directory (ZeRO-2, one complete checkpoint)."""
    import shutil

    root, _ = foreign
    (source,) = (root / "runs").glob("straight-*")
    return Path(shutil.copytree(source, tmp_path / "run"))


def _corrupt(kind: str, run_dir: Path, root: Path, tmp_path: Path):
    """Break something; return (resume spec, extra overrides, text the error must contain)."""
    (tag_dir,) = (run_dir / "checkpoints").glob("step_*")
    if kind == "truncated":
        states = tag_dir / "mp_rank_00_model_states.pt"
        states.write_bytes(states.read_bytes()[:1000])
        return str(run_dir), [], f"checkpoint file {states} is truncated"
    if kind == "flipped":  # 16 bytes of an optimizer shard's tensor data: loads, but not as written
        shard = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        data = bytearray(shard.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        shard.write_bytes(bytes(data))
        return str(run_dir), [], f"checkpoint file {shard} does not match the checksum written with it"
    if kind == "missing_shard":
        shard = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        shard.unlink()
        return str(run_dir), [], f"checkpoint shard {shard} is missing"
    if kind == "no_latest":
        return str(root / "ds_hf"), [], f"{root / 'ds_hf' / 'latest'} is missing"
    if kind == "not_a_checkpoint":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "readme.txt").write_text("hello")
        return str(tmp_path / "notes"), [], "no DeepSpeed tag"
    if kind == "a_file":
        return str(root / "hf_sharded" / "model-00001-of-00002.safetensors"), [], "model.init_from"
    if kind == "hf_names":
        return f"{root / 'ds_hf'}:global_step0", [], f"model.init_from={root / 'ds_hf'}:global_step0"
    if kind == "shape":
        return str(root / "ds_ours"), ["model.num_layers=3"], "that this model does not have"
    if kind == "zero_stage":
        return str(root / "ds_ours"), ["train.zero_stage=3"], "set train.zero_stage=2"
    assert kind == "plan"
    from launch.cli import main

    assert main(["plan", "--profile", "cpu", "--out", str(tmp_path / "p.yaml")]) == 0  # for seq_len 256
    return str(run_dir), [f"plan.path={tmp_path / 'p.yaml'}"], "re-plan"


@pytest.mark.parametrize("kind", ["truncated", "flipped", "missing_shard", "no_latest", "not_a_checkpoint", "a_file",
                                  "hf_names", "shape", "zero_stage", "plan"])
def test_a_bad_checkpoint_is_one_line_and_nothing_is_written(foreign, tmp_path, capsys, kind):
    from launch.cli import main

    root, _ = foreign
    run_dir = _own_run(foreign, tmp_path)
    spec, extra, expected = _corrupt(kind, run_dir, root, tmp_path)
    before, roots_before = _tree(run_dir), sorted(os.listdir(tmp_path))
    capsys.readouterr()
    code = main(["train", *BASE, f"run.root={tmp_path / 'runs'}", f"resume={spec}", *extra])
    err = capsys.readouterr().err.strip()
    print(err)
    assert code == 2 and len(err.splitlines()) == 1 and expected in err
    assert _tree(run_dir) == before and sorted(os.listdir(tmp_path)) == roots_before


class ClientObject:
    """What another training program might keep in DeepSpeed's client_state."""


def test_client_state_of_another_program_needs_trust_pickles(foreign, tmp_path):
    """Its own objects are not tensors: loading them could run code, so only checkpoint.trust_pickles loads them."""
    import shutil

    from orchestrator.checkpoint import inspect_checkpoint
    from spec.errors import CheckpointError

    root, _ = foreign
    copy = Path(shutil.copytree(root / "ds_ours", tmp_path / "ds"))
    states_file = copy / "global_step4" / "mp_rank_00_model_states.pt"
    states = torch.load(states_file, weights_only=False)
    torch.save(dict(states, trainer_state=ClientObject()), states_file)
    with pytest.raises(CheckpointError, match=f"{states_file} holds Python objects of type "
                                              "tests.test_resume_foreign.ClientObject.*trust_pickles=true"):
        inspect_checkpoint(copy, "global_step4")
    info = inspect_checkpoint(copy, "global_step4", trust=True)
    assert (info.world_size, info.zero_stage, info.hf_names) == (1, 2, False)


def test_a_failed_conversion_leaves_nothing_behind(foreign, tmp_path):
    """ds_to_universal failing (here: its optimizer shard is gone) removes what the conversion wrote."""
    import shutil

    from launch.rundir import RunPlacement
    from orchestrator.checkpoint import CheckpointInfo, convert_to_universal
    from spec.errors import CheckpointError

    root, _ = foreign
    broken = Path(shutil.copytree(root / "ds_ours" / "global_step4", tmp_path / "ckpt" / "global_step4"))
    (broken / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    info = CheckpointInfo(broken, world_size=2, zero_stage=2, hf_names=False)
    job = load_job_config(None, BASE)
    run_dir = _own_run(foreign, tmp_path)
    before = _tree(run_dir)
    for placement in (RunPlacement(tmp_path / "new_run", continuing=False), RunPlacement(run_dir, continuing=True)):
        with pytest.raises(CheckpointError, match="universal checkpoint failed .* cluster.num_workers=2 instead"):
            convert_to_universal(job, placement, info, log=lambda line: None)
    assert not (tmp_path / "new_run").exists() and _tree(run_dir) == before
