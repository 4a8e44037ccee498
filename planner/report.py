"""What a person reads after `longtrain plan`: a table per group of identical layers, the predicted totals,
and a PNG of the memory layout (address against time, one rectangle per buffer)."""

from itertools import groupby
from pathlib import Path
from typing import List

from spec.plan import LayerPlan, Plan

GIB = 2**30


def layer_groups(layers: List[LayerPlan]) -> List[tuple]:
    """(first, last, decision) for runs of consecutive layers with the same decision."""
    key = lambda d: (d.keep_fraction, d.swap_fraction, d.recompute_fraction,  # noqa: E731
                     d.offload_skeletal, d.swap_codec, d.activation_compression)
    groups, index = [], 0
    for _, run in groupby(layers, key=key):
        run = list(run)
        groups.append((index, index + len(run) - 1, run[0]))
        index += len(run)
    return groups


def _compression(decision: LayerPlan) -> str:
    """The swap's int8 and the layer's compact activations, in the settings' own words (approximate)."""
    parts = [] if decision.swap_codec == "none" else [f"swap {decision.swap_codec}"]
    spec = decision.activation_compression
    if spec != "none":
        defaults = {"linear_inputs": "none", "norm_inputs": "none", "silu": "none", "wta_crs_keep_ratio": "1.0"}
        chosen = [item for item in spec.split() if item.split("=")[0] in defaults
                  and item.split("=")[1] != defaults[item.split("=")[0]]]
        parts.append(" ".join(chosen))
    return "; ".join(parts) or "none"


def plan_summary(plan: Plan, plan_path: Path, png_path: Path, seconds: float) -> str:
    p, inputs = plan.predicted, plan.inputs
    lines = [f"plan for {inputs['model']['num_layers']} layers x hidden {inputs['model']['hidden_size']}, "
             f"seq_len {inputs['seq_len']:,} on {inputs['world_size']} x {inputs['profile']} "
             f"(sp_degree {inputs['sp_degree']}, ZeRO-{inputs['zero_stage']}, {inputs['precision']})",
             "  layers      keep   swap   recompute   skeletal    compression"]
    for first, last, d in layer_groups(plan.layers):
        lines.append(f"  {first:>3}-{last:<3}   {d.keep_fraction:>5.2f}  {d.swap_fraction:>5.2f}   "
                     f"{d.recompute_fraction:>7.2f}     {'host' if d.offload_skeletal else 'gpu':<8}    "
                     f"{_compression(d)}")
    static = p["static_gib"]
    lines += [
        f"  step time   {p['step_seconds']:.3f} s   MFU {p['mfu']:.1%} ({p['mfu_convention']})   "
        f"{p['tokens_per_second_per_gpu']:,.0f} tokens/s per GPU",
        f"  GPU peak    {p['peak_gpu_gib']:.2f} GiB of {p['gpu_budget_gib']:.2f} GiB budget (weights "
        f"{static['parameters']:.2f}, grads {static['gradients']:.2f}, optimizer {static['optimizer_states']:.2f}, "
        f"activation arena {plan.arena_bytes / GIB:.2f})",
        f"  host        {p['host_gib']:.2f} GiB of {p['host_budget_gib']:.2f} GiB per GPU; "
        f"{p['swap_gb_per_step']:.2f} GB over PCIe per step",
        *_host_memory_line(p),
        f"  layout      arena / lower bound = {plan.arena_bytes / max(plan.lower_bound_bytes, 1):.3f} "
        f"(greedy {plan.solver['layout']['greedy_arena_bytes'] / max(plan.lower_bound_bytes, 1):.3f}; "
        f"{plan.solver['layout']['status']}); layer block {plan.layer_block['arena_bytes'] / GIB:.2f} GiB, ratio "
        f"{plan.layer_block['arena_bytes'] / max(plan.layer_block['lower_bound_bytes'], 1):.3f}",
        f"  solvers     policy {plan.solver['policy']['name']} {plan.solver['policy']['status']} "
        f"{plan.solver['policy']['seconds']:.2f} s; planned in {seconds:.2f} s",
        f"  wrote       {plan_path}  and  {png_path}",
    ]
    lines += [f"  note        {note}" for note in plan.notes]
    return "\n".join(lines)


def _host_memory_line(predicted: dict) -> List[str]:
    """Where the host memory figure comes from and what offload takes of it (jobs with LoRA, offload, the tiled
    MLP or plan.host_memory_gib; other plans print as they always did)."""
    host = predicted.get("host_memory")
    if not host:
        return []
    offloaded = f"; offloaded optimizer/parameters {host['offloaded_gib']:.2f} GiB per GPU" \
        if host["offloaded_gib"] else ""
    return [f"  host memory {host['node_gib']:g} GiB per node: {host['source']}{offloaded}"]


def plot_layout(plan: Plan, path: Path) -> None:
    """Address (GiB) against event index; the per-layer block's own layout in a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    figure, (whole, block) = plt.subplots(1, 2, figsize=(14, 7), gridspec_kw={"width_ratios": [3, 2]})
    for axis, entries, arena, title in (
            (whole, plan.layout, plan.arena_bytes, "step: forward layers, LM head, backward layers"),
            (block, plan.layer_block_layout, plan.layer_block["arena_bytes"], "one layer: forward then backward")):
        colours = plt.get_cmap("tab20")
        names = sorted({e["name"] for e in entries})
        for entry in entries:
            colour = colours(names.index(entry["name"]) % 20)
            axis.add_patch(Rectangle((entry["start"], entry["offset_bytes"] / GIB), entry["end"] - entry["start"],
                                     entry["size_bytes"] / GIB, facecolor=colour, edgecolor="black", linewidth=0.3))
        axis.set_xlim(0, max((e["end"] for e in entries), default=1))
        axis.set_ylim(0, max(arena / GIB, 1e-9) * 1.05)
        axis.set_xlabel("event")
        axis.set_ylabel("address (GiB)")
        axis.set_title(title, fontsize=10)
        axis.legend(handles=[Rectangle((0, 0), 1, 1, color=colours(i % 20)) for i in range(len(names))],
                    labels=names, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5)
    figure.suptitle(f"memory layout: arena {plan.arena_bytes / GIB:.2f} GiB, lower bound "
                    f"{plan.lower_bound_bytes / GIB:.2f} GiB")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
