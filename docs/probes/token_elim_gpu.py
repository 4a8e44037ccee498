"""GPU probe for issue 8, the command behind the token_elim numbers in docs/log.md (until `longtrain bench` has a
token_elim row): segmented LM head + loss at Llama-3 vocabulary, 4 Llama-7B layers dense vs token_elim (peak memory,
forward+backward time), the Triton scoring kernel against the torch path, and the segmented loss under ZeRO-3.

Run on the device from the repo root: `source .gpu-bundle/activate.sh && python3 docs/probes/token_elim_gpu.py`
(writes $OUT/probe.json).
"""
import json, os, sys, time
import torch
import torch.nn.functional as F
from types import SimpleNamespace

from spec.config import load_job_config
from orchestrator.loss import segmented_cross_entropy
from orchestrator.memory import token_elim
from orchestrator.model import DecoderLayer, LlamaModel, rope_tables
from spec.units import GIB

dev = torch.device("cuda")
results = {"device": torch.cuda.get_device_name()}


def measure(fn, repeats=3):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(); t = time.time(); fn(); torch.cuda.synchronize(); times.append(time.time() - t)
    return (torch.cuda.max_memory_allocated() - base) / GIB, sorted(times)[len(times) // 2] * 1e3


def loss_probe():
    tokens, hidden, vocab = 32768, 4096, 128256
    head = torch.nn.Linear(hidden, vocab, bias=False, device=dev, dtype=torch.bfloat16)
    h = torch.randn(1, tokens, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, vocab, (1, tokens), device=dev)

    def full():
        F.cross_entropy(head(h).float().flatten(0, 1), t.flatten()).backward()

    def seg():
        segmented_cross_entropy(h, head, t).backward()
    out = {}
    for name, fn in (("segmented", seg), ("full", full)):
        try:
            out[name] = measure(fn)
        except torch.OutOfMemoryError:
            out[name] = "out of memory"
        head.weight.grad = None; h.grad = None; torch.cuda.empty_cache()
    with torch.no_grad():
        a = F.cross_entropy(head(h[:, :4096]).float().flatten(0, 1), t[:, :4096].flatten())
        b = segmented_cross_entropy(h[:, :4096], head, t[:, :4096], 1024)
    out["loss_rel_diff_bf16_4k"] = abs(a.item() - b.item()) / a.item()
    results["lm_head_32k_llama3_vocab"] = out


def elim_probe(seq, ratios):
    config = load_job_config(None, ["model.preset=llama-7b"]).model
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(DecoderLayer(config) for _ in range(4)).to(dev, torch.bfloat16)
    for p in layers.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, seq, config.hidden_size, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_tables(torch.arange(seq, device=dev), config.head_dim, config.rope_theta, torch.bfloat16)

    def step():
        y = x
        for layer in layers:
            y = layer(y, cos, sin)
        y.float().square().mean().backward()
    rows = {}
    for ratio in ratios:
        for layer in layers:
            layer.token_elim = None
        if ratio != "dense":
            token_elim.apply(SimpleNamespace(layers=list(layers)), token_elim.Config(keep_ratio=float(ratio)), range(4))
        try:
            mem, ms = measure(step)
            rows[str(ratio)] = {"peak_gib": round(mem, 2), "fwd_bwd_ms": round(ms, 1)}
        except torch.OutOfMemoryError:
            rows[str(ratio)] = "out of memory"
        layers.zero_grad(set_to_none=True); x.grad = None; torch.cuda.empty_cache()
    # scoring alone
    layer = layers[0]
    with torch.no_grad():
        normed = layer.attn_norm(x)
        q, k = token_elim.rotated_query_key(layer, normed, cos, sin)
        torch.cuda.synchronize(); t = time.time()
        token_elim.block_informativeness(q, k, 64); torch.cuda.synchronize()
        rows["scoring_ms_per_layer"] = round((time.time() - t) * 1e3, 1)
    results[f"elim_4x_llama7b_layers_{seq}"] = rows


def zero3_probe():
    import deepspeed
    from orchestrator.ds_config import deepspeed_config
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl")
    job = load_job_config(None, ["train.zero_stage=3", "train.precision=fp32", "data.micro_batch_size=2",
                                 "data.seq_len=512", "optim.lr=1e-3", "optim.warmup_steps=1", "train.max_steps=10"])
    torch.manual_seed(0)
    plain = LlamaModel(job.model).to(dev)
    torch.manual_seed(0)
    model = LlamaModel(job.model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(job, True))
    tokens = torch.randint(0, 256, (2, 513), device=dev)
    ref = F.cross_entropy(plain.lm_head(plain.hidden_states(tokens[:, :-1])).flatten(0, 1), tokens[:, 1:].flatten())
    ref.backward()
    ref_norm = torch.sqrt(sum(p.grad.float().square().sum() for p in plain.parameters())).item()
    loss = engine(tokens[:, :-1], targets=tokens[:, 1:])
    engine.backward(loss)
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    engine.step()
    loss2 = engine(tokens[:, :-1], targets=tokens[:, 1:])
    results["zero3_segmented"] = {"plain_full_loss": ref.item(), "zero3_segmented_loss": loss.item(),
                                  "plain_grad_norm": ref_norm,
                                  "zero3_grad_norm": float(norm) if norm is not None else None,
                                  "loss_after_step": loss2.item()}


def kernel_probe():
    out = {}
    for seq in (32768, 65536):
        q = torch.randn(1, 32, seq, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 32, seq, 128, device=dev, dtype=torch.bfloat16)
        for name, env in (("triton", "0"), ("torch", "1")):
            os.environ["LONGTRAIN_TORCH_SCORING"] = env
            token_elim.block_informativeness(q, k, 64); torch.cuda.synchronize()
            t = time.time(); s = token_elim.block_informativeness(q, k, 64); torch.cuda.synchronize()
            out[f"{name}_{seq}_ms"] = round((time.time() - t) * 1e3, 2)
            out[f"{name}_{seq}_scores"] = s
        a, b = out.pop(f"triton_{seq}_scores"), out.pop(f"torch_{seq}_scores")
        out[f"max_rel_diff_{seq}"] = ((a - b).abs() / b.abs().clamp(min=1e-6)).max().item()
        kk = seq // 64 * 2 // 5
        out[f"top40_agree_{seq}"] = len(set(a.topk(kk).indices[0].tolist()) & set(b.topk(kk).indices[0].tolist())) / kk
    os.environ["LONGTRAIN_TORCH_SCORING"] = "0"
    results["scoring_kernel"] = out


PROBES = (("loss", loss_probe), ("kernel", kernel_probe),
          ("elim32k", lambda: elim_probe(32768, ["dense", 1.0, 0.4, 0.2])),
          ("elim64k", lambda: elim_probe(65536, ["dense", 0.4])),
          ("elim128k", lambda: elim_probe(131072, ["dense", 0.4])),
          ("zero3", zero3_probe))
for name, fn in PROBES:
    if len(sys.argv) > 1 and name not in sys.argv[1:]:  # e.g. `python3 docs/probes/token_elim_gpu.py loss kernel`
        continue
    try:
        fn()
    except Exception as error:  # keep the other probes' numbers
        results[name + "_error"] = repr(error)[:500]
    print(json.dumps(results, indent=1), flush=True)
    torch.cuda.empty_cache()
os.makedirs(os.environ.get("OUT", "/tmp/out"), exist_ok=True)
json.dump(results, open(os.path.join(os.environ.get("OUT", "/tmp/out"), "probe.json"), "w"), indent=1)
