"""LoRA through peft: the same adapters on Hugging Face's Llama (a plain PyTorch copy of our model, wrapped by
peft's own `get_peft_model`) give our gradients; only the adapters train; the memory techniques still see the
linears' inputs when peft wraps the linears (token-wise split exact, compression slots on `lora_A`); the tiled MLP
equals the untiled one."""

import pytest
import torch

from orchestrator.lora import apply_lora, trainable_parameters
from orchestrator.memory import apply_plan, tiled_mlp
from orchestrator.model import LlamaModel, Linear
from spec.config import load_job_config
from tests.conftest import layer_plans, loss_and_grads

SHAPE = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2",
         "model.intermediate_size=160", "model.tie_embeddings=false", "model.lora.rank=4", "model.lora.alpha=8"]


def _job(*overrides):
    return load_job_config(None, [*SHAPE, *overrides])


def _lora_model(job, seed=0):
    """Our model with adapters whose B is random too (peft starts B at zero, which zeroes A's gradient)."""
    torch.manual_seed(seed)
    model = apply_lora(LlamaModel(job.model), job.model.lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model


def _batch(seq=96, rows=2, vocab=256):
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, vocab, (rows, seq), generator=generator),
            torch.randint(0, vocab, (rows, seq), generator=generator))


def _hf_copy(model, job):
    """Hugging Face's LlamaForCausalLM with our base weights, and peft's LoRA with our adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.checkpoint.weights import hf_name

    m = job.model
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                         num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                         intermediate_size=m.intermediate_size, rms_norm_eps=m.norm_eps,
                         tie_word_embeddings=m.tie_embeddings, attention_bias=False,
                         rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta})
    config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(config)
    base = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    hf.load_state_dict({hf_name(k): v for k, v in base.items()}, strict=True)
    lora = job.model.lora
    peft_model = get_peft_model(hf, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                               target_modules=list(lora.target_modules)))
    ours = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    theirs = {_peft_name(k): v for k, v in ours.items()}
    missing = peft_model.load_state_dict(theirs, strict=False)
    assert not missing.unexpected_keys
    return peft_model


def _peft_name(ours: str) -> str:
    """layers.0.attn.q_proj.lora_A.default.weight -> base_model.model.model.layers.0.self_attn.q_proj.lora_A..."""
    from orchestrator.checkpoint.weights import hf_name

    projection, adapter = ours.split(".lora_", 1)
    return "base_model.model." + hf_name(projection + ".weight")[: -len(".weight")] + ".lora_" + adapter


def test_lora_gradients_equal_peft_on_a_plain_pytorch_llama():
    job = _job()
    model = _lora_model(job)
    peft_model = _hf_copy(model, job)
    tokens, targets = _batch()
    loss, grads = loss_and_grads(model, tokens, targets)
    logits = peft_model(input_ids=tokens).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    hf_loss.backward()
    theirs = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(theirs) == len(grads) == 2 * 7 * job.model.num_layers
    torch.testing.assert_close(loss, hf_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, theirs[_peft_name(name)], rtol=1e-4, atol=1e-6)


def test_only_the_adapters_train_and_lora_A_carries_the_input_slot():
    job = _job("model.lora.target_modules=[q_proj,v_proj,down_proj]")
    model = _lora_model(job)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 3 * job.model.num_layers
    assert len(trainable_parameters(model)) == len(names)
    layer = model.layers[0]
    assert isinstance(layer.attn.q_proj.lora_A["default"], Linear)
    assert not layer.attn.q_proj.base_layer.weight.requires_grad
    assert not model.embed.weight.requires_grad and not model.lm_head.weight.requires_grad


@pytest.mark.parametrize("decisions", [[(0.0, 0.5, 0.5), (0.25, 0.0, 0.75, True)], [(0.5, 0.5, 0.0, True)] * 2])
def test_a_token_wise_plan_splits_the_adapters_inputs_and_stays_exact(decisions):
    """peft's lora_A saves the very tensor the layer tags (no copy, no cast), so the split keeps, swaps or
    recomputes it; gradients equal the unsplit LoRA model's bit for bit."""
    job = _job()
    tokens, targets = _batch()
    plain = loss_and_grads(_lora_model(job), tokens, targets)
    model = _lora_model(job)
    applied = apply_plan(model, _plan(decisions), job.compression, job.token_elim, job.train)
    assert applied.runtime is not None
    split = loss_and_grads(model, tokens, targets)
    assert torch.equal(plain[0], split[0])
    assert all(torch.equal(plain[1][k], split[1][k]) for k in plain[1])


def test_compressed_linear_inputs_are_the_adapters_inputs():
    """With compression.linear_inputs=int8 the adapter's lora_A keeps int8 codes of its input; the frozen base
    keeps none."""
    job = _job("compression.linear_inputs=int8")
    model = _lora_model(job)
    apply_plan(model, None, job.compression, job.token_elim, job.train)
    layer = model.layers[0]
    assert layer.attn.q_proj.lora_A["default"].saved_input is not None
    assert layer.attn.q_proj.base_layer.saved_input is None
    saved = []
    tokens, targets = _batch()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model.layers[0](model.embed(tokens), *_rope(job, tokens.shape[1]))
    codes = {t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.uint8}
    assert len(codes) == 3  # int8 codes of q/k/v's shared input, gate/up's and down's, each stored once


def _rope(job, seq):
    from orchestrator.model import rope_tables

    return rope_tables(torch.arange(seq), job.model.head_dim, job.model.rope_theta, torch.float32)


def _plan(decisions):
    from spec.plan import Plan

    plan = Plan.__new__(Plan)
    plan.layers = layer_plans(decisions)
    plan.runtime_arena, plan.predicted = {}, {}
    return plan


def test_tiled_mlp_forward_and_backward_equal_the_untiled_mlp():
    """DeepSpeed's TiledMLP on our MLP, tiles shorter than the sequence: equal within fp32 rounding."""
    job = load_job_config(None, SHAPE[:5])
    tokens, targets = _batch(seq=200)
    torch.manual_seed(0)
    model = LlamaModel(job.model)
    loss, grads = loss_and_grads(model, tokens, targets)
    tiled_mlp.apply(model, tiled_mlp.Config(tile_tokens=48), range(job.model.num_layers))
    tiled_loss, tiled_grads = loss_and_grads(model, tokens, targets)
    torch.testing.assert_close(tiled_loss, loss, rtol=1e-6, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_tiled_mlp_under_a_token_wise_plan_saves_only_the_mlp_input_and_stays_close():
    """Under a plan the tiled MLP's only saved MLP tensor is its input, split like the others; gradients equal the
    untiled, unsplit model's within fp32 rounding (tiles sum the weight gradients in another order)."""
    job = load_job_config(None, SHAPE[:5])
    tokens, targets = _batch(seq=128)
    torch.manual_seed(0)
    reference = loss_and_grads(LlamaModel(job.model), tokens, targets)
    torch.manual_seed(0)
    model = LlamaModel(job.model)
    tiled_mlp.apply(model, tiled_mlp.Config(tile_tokens=32), range(job.model.num_layers))
    apply_plan(model, _plan([(0.25, 0.25, 0.5), (0.0, 0.0, 1.0, True)]), job.compression, job.token_elim, job.train)
    loss, grads = loss_and_grads(model, tokens, targets)
    torch.testing.assert_close(loss, reference[0], rtol=1e-6, atol=1e-7)
    for name, grad in reference[1].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)


def _run(run_dir, *overrides):
    from tests.conftest import spawn_gloo, train_rank

    job = load_job_config(None, ["cluster.num_workers=1", "train.max_steps=6", "train.log_every_steps=1",
                                 "optim.warmup_steps=2", "optim.lr=1e-2", "checkpoint.every_steps=0",
                                 "data.seq_len=128", "data.micro_batch_size=2", "model.lora.rank=4", *overrides])
    messages = spawn_gloo(train_rank, 1, job, str(run_dir))
    return {m["step"]: m["rows"][0]["loss"] for m in messages if m["kind"] == "step"}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_lora_run_checkpoints_only_the_adapters_and_resumes_exactly(tmp_path, zero_stage):
    """DeepSpeed trains the adapters alone (the base stays as built), writes only them (plus the base's record)
    and a run stopped at step 3 and resumed equals an uninterrupted one bit for bit."""
    from orchestrator.checkpoint import inspect_checkpoint
    from orchestrator.lora import adapter_shapes

    stage = f"train.zero_stage={zero_stage}"
    straight = _run(tmp_path / "straight", stage)
    first = _run(tmp_path / "split", stage, "train.stop_at_step=3")
    second = _run(tmp_path / "split", stage)
    assert {**first, **second} == straight and straight[6] < straight[1]
    tag = tmp_path / "split" / "checkpoints"
    info = inspect_checkpoint(tag, "step_00000006")
    assert set(info.shapes) == set(adapter_shapes(_job("model.lora.rank=4", "model.num_layers=4",
                                                       "model.hidden_size=128", "model.intermediate_size=352",
                                                       "model.tie_embeddings=true").model))
    states = torch.load(next((tag / "step_00000006").glob("*model_states.pt")), weights_only=False)
    assert states["lora_base"] == {"init_from": None, "sha256": None, "random_seed": "1234"}


@pytest.mark.slow
def test_export_writes_a_peft_adapter_and_a_merged_model_that_agree(tmp_path):
    """A LoRA run on a Hugging Face base -> `longtrain export --lora adapter` loads with peft onto the base, and
    `--lora merged` loads with transformers alone; both give the same logits, and they differ from the base's (the
    adapters trained). A changed base is refused for the merged form; a random base exports adapters only."""
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    from launch.cli import main
    from spec.config import job_to_yaml
    from tests.conftest import spawn_gloo, train_rank
    from tests.test_hf_models import tiny

    base_dir = tiny.make_model(tmp_path / "base", "llama", "none", tied=True)
    run = tmp_path / "run"
    job = load_job_config(None, ["cluster.num_workers=1", "train.max_steps=3", "optim.warmup_steps=1",
                                 "optim.lr=3e-2", "train.log_every_steps=1", "checkpoint.every_steps=0",
                                 "data.seq_len=128", "data.micro_batch_size=2", "model.lora.rank=4",
                                 f"model.init_from={base_dir}", f"run.dir={run}"])
    run.mkdir()
    (run / "config.yaml").write_text(job_to_yaml(job))
    spawn_gloo(train_rank, 1, job, str(run))
    assert main(["export", str(run), str(tmp_path / "adapter")]) == 0
    assert main(["export", str(run), str(tmp_path / "merged"), "--lora", "merged", "--dtype", "fp32"]) == 0
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    auto = transformers.AutoModelForCausalLM
    with torch.no_grad():
        base_logits = auto.from_pretrained(base_dir)(ids).logits
        adapted = PeftModel.from_pretrained(auto.from_pretrained(base_dir), tmp_path / "adapter")(input_ids=ids).logits
        merged = auto.from_pretrained(tmp_path / "merged")(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-3, atol=2e-3)  # the adapter directory is bf16
    assert (merged - base_logits).abs().max() > 1e-2
    (base_dir / "model.safetensors").write_bytes((base_dir / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    assert main(["export", str(run), str(tmp_path / "merged2"), "--lora", "merged"]) == 2
    assert not (tmp_path / "merged2").exists()
