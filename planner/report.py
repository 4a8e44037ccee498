"""What a person reads after `longtrain plan`: a table per group of identical layers, the predicted totals,
and a PNG of the memory layout (address against time, one rectangle per buffer)."""

from itertools import groupby
from pathlib import Path
from typing import List

from spec.plan import LayerPlan, Plan
from spec.units import GIB


def layer_groups(layers: List[LayerPlan]) -> List[tuple]:
    """(first, last, decision) for runs of consecutive layers with the same decision."""
    key = lambda d: (d.keep_fraction, d.swap_fraction, d.recompute_fraction,  # noqa: E731
                     d.offload_skeletal, d.swap_codec, d.activation_compression, d.checkpoint_layer)
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
        shares = (f"{'whole layer replayed':<22}" if d.checkpoint_layer else
                  f"{d.keep_fraction:>5.2f}  {d.swap_fraction:>5.2f}   {d.recompute_fraction:>7.2f}")
        lines.append(f"  {first:>3}-{last:<3}   {shares}     {'host' if d.offload_skeletal else 'gpu':<8}    "
                     f"{_compression(d)}")
    if any(d.checkpoint_layer for d in plan.layers):
        lines.append("  (whole layer replayed: the layer keeps only its input, where the skeletal column says, and "
                     "runs its forward again in backward, attention included)")
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
        *_alltoall_line(p),
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
    """Where the host memory figure comes from and what offload takes of it (plans made before it was recorded
    print no line)."""
    host = predicted.get("host_memory")
    if not host:
        return []
    offloaded = f"; offloaded optimizer/parameters {host['offloaded_gib']:.2f} GiB per GPU" \
        if host["offloaded_gib"] else ""
    return [f"  host memory {host['node_gib']:g} GiB per node: {host['source']}{offloaded}"]


def _alltoall_line(predicted: dict) -> List[str]:
    """Ulysses' all-to-all in the step time and where its bandwidth comes from (sequence-parallel plans)."""
    alltoall = predicted.get("alltoall")
    if not alltoall:
        return []
    return [f"  all-to-all  {alltoall['seconds_per_step']:.3f} s per step (Ulysses): {alltoall['source']}"]


def plot_layout(plan: Plan, path: Path) -> None:
    """What a user plans with on top (GPU memory against the budget: static parts, activation arena, predicted peak;
    each layer's keep / swap / recompute shares), the allocator's view below (address in GiB against event index
    for the whole step and for one layer's block)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    figure = plt.figure(figsize=(14, 11))
    grid = figure.add_gridspec(2, 2, width_ratios=[1, 3], height_ratios=[2, 3])
    _plot_budget(figure.add_subplot(grid[0, 0]), plan)
    _plot_decisions(figure.add_subplot(grid[0, 1]), plan)
    inner = grid[1, :].subgridspec(1, 2, width_ratios=[3, 2])
    whole, block = figure.add_subplot(inner[0]), figure.add_subplot(inner[1])
    for axis, entries, arena, title in (
            (whole, plan.layout, plan.arena_bytes, "step: forward layers, LM head, backward layers"),
            (block, plan.layer_block_layout, plan.layer_block["arena_bytes"], "one layer: forward then backward")):
        names = sorted({e["name"] for e in entries})
        colours = _distinct_colours(plt, len(names))
        for entry in entries:
            colour = colours(names.index(entry["name"]))
            axis.add_patch(Rectangle((entry["start"], entry["offset_bytes"] / GIB), entry["end"] - entry["start"],
                                     entry["size_bytes"] / GIB, facecolor=colour, edgecolor="black", linewidth=0.3))
        axis.set_xlim(0, max((e["end"] for e in entries), default=1))
        axis.set_ylim(0, max(arena / GIB, 1e-9) * 1.05)
        axis.set_xlabel("event")
        axis.set_ylabel("address (GiB)")
        axis.set_title(title, fontsize=10)
        axis.legend(handles=[Rectangle((0, 0), 1, 1, color=colours(i)) for i in range(len(names))],
                    labels=names, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5)
    predicted = plan.predicted
    figure.suptitle(f"plan: predicted GPU peak {predicted['peak_gpu_gib']:.2f} of {predicted['gpu_budget_gib']:.2f} GiB "
                    f"budget; activation arena {plan.arena_bytes / GIB:.2f} GiB (lower bound "
                    f"{plan.lower_bound_bytes / GIB:.2f} GiB)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _distinct_colours(plt, count: int):
    """index -> colour, no two alike: tab20 up to 20 names, evenly spaced hues beyond (tab20 repeated colours)."""
    if count <= 20:
        return plt.get_cmap("tab20")
    spread = plt.get_cmap("hsv")
    return lambda index: spread(index / count)


def _plot_budget(axis, plan: Plan) -> None:
    """One stacked bar: the static parts and the activation arena, the GPU budget as a line, the predicted peak
    as a marker. A static part the arena's layout also holds (the LM head and loss) is drawn once, in the arena."""
    predicted = plan.predicted
    parts = budget_parts(plan)
    bottom = 0.0
    for index, (name, gib) in enumerate(parts):
        axis.bar(0, gib, bottom=bottom, width=0.6, color=f"C{index % 10}", edgecolor="black", linewidth=0.3,
                 label=f"{name} {gib:.2f}")
        bottom += gib
    axis.axhline(predicted["gpu_budget_gib"], color="red", linewidth=2,
                 label=f"budget {predicted['gpu_budget_gib']:.2f}")
    axis.plot([0], [predicted["peak_gpu_gib"]], marker="v", color="black", markersize=10, linestyle="none",
              label=f"predicted peak {predicted['peak_gpu_gib']:.2f}")
    axis.set_xlim(-0.6, 0.6)
    axis.set_xticks([])
    axis.set_ylim(0, max(predicted["gpu_budget_gib"], predicted["peak_gpu_gib"], bottom) * 1.1)
    axis.set_ylabel("GPU memory per GPU (GiB)")
    axis.set_title("static memory + activation arena vs budget", fontsize=10)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def budget_parts(plan: Plan) -> List[tuple]:
    """(label, GiB) of what fills the GPU at the peak: the static parts, then the activation arena, which also holds
    the static parts its layout names (the LM head and loss), so those are counted once, in the arena."""
    static = plan.predicted["static_gib"]
    in_arena = {entry["name"] for entry in plan.layout} & set(static)
    parts = [(name.replace("_", " "), gib) for name, gib in static.items() if gib > 0 and name not in in_arena]
    held = f" (incl. {', '.join(sorted(in_arena))})" if in_arena else ""
    return parts + [(f"activation arena{held}", plan.arena_bytes / GIB)]


def _plot_decisions(axis, plan: Plan) -> None:
    """Each layer's share of tokens kept on the GPU, swapped to the host and recomputed (stacked to 1); hatched
    layers keep their skeletal tensors on the host."""
    layers = range(len(plan.layers))
    keep = [d.keep_fraction for d in plan.layers]
    swap = [d.swap_fraction for d in plan.layers]
    recompute = [d.recompute_fraction for d in plan.layers]
    axis.bar(layers, keep, color="tab:green", label="keep (GPU)")
    axis.bar(layers, swap, bottom=keep, color="tab:blue", label="swap (host)")
    axis.bar(layers, recompute, bottom=[k + s for k, s in zip(keep, swap)], color="tab:orange", label="recompute")
    replayed = [index for index, decision in enumerate(plan.layers) if decision.checkpoint_layer]
    if replayed:
        axis.bar(replayed, [1] * len(replayed), color="tab:red", label="whole layer replayed (input kept)")
    for index, decision in enumerate(plan.layers):
        if decision.offload_skeletal:
            axis.bar(index, 1, fill=False, hatch="//", edgecolor="black", linewidth=0)
    axis.set_xlim(-0.6, len(plan.layers) - 0.4)
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_ylim(0, 1.05)
    axis.set_xlabel("layer")
    axis.set_ylabel("share of token-wise activations")
    axis.set_title("per-layer decisions (hatched: layer inputs / attention outputs, or a replayed layer's input, on the "
                   "host)", fontsize=10)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
