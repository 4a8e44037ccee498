"""The `longtrain` command line.

Every user mistake surfaces as one line on stderr and exit code 2 (`--debug` shows the traceback); a failed
training run exits 1 and says where its logs are and how to resume.
"""

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

from spec.config.schema import ALLOCATORS, ATTENTION_KERNELS, ELEMENTWISE
from spec.errors import LongtrainError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UsageError(LongtrainError):
    """The command line itself is wrong (unknown flag or command, missing argument)."""


class Parser(argparse.ArgumentParser):
    """argparse that takes whole option names only (`--profil` is not `--profile`) and reports a usage mistake as
    one `UsageError` line instead of printing the usage text and exiting."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message}; see `{self.prog} --help`")


DEBUG_FLAG = Parser(add_help=False)
"""`--debug` after any command (a parent of every command's parser)."""
DEBUG_FLAG.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        print(f"longtrain: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.handler(args)
    except (LongtrainError, KeyboardInterrupt, OSError) as error:
        if args.debug or (isinstance(error, OSError) and not error.filename):
            raise  # an OSError without a file name is not about the user's files: a bug to see whole
        return _one_line(error)


def _one_line(error: BaseException) -> int:
    """Print the error as one line; its exit code (2 for a mistake to fix, 130 for Ctrl-C)."""
    if isinstance(error, KeyboardInterrupt):
        print("longtrain: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(error, OSError):  # a file read or written: the machine's state (space, rights), not a bug
        other = f" -> {error.filename2}" if error.filename2 else ""
        error = f"{error.filename}{other}: {error.strerror or error}; check the path, its permissions and free space"
    print(f"longtrain: error: {error}", file=sys.stderr)
    return EXIT_USER_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="longtrain", description="Long-context LLM training orchestrator.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--version", action="version", version=f"longtrain {_version()}")
    commands = parser.add_subparsers(dest="command")
    train = _command(commands, "train", help="train a job (default: configs/default.yaml)",
                     description="longtrain train [CONFIG.yaml] [key=value ...]; e.g. "
                                 "longtrain train model.num_layers=2 resume=auto",
                     epilog="every config key with its default: longtrain config show --help")
    train.add_argument("args", nargs="*", metavar="CONFIG_OR_OVERRIDE")
    train.add_argument("--dry-run", action="store_true", help="resolve the config, run every check a start makes "
                       "(data, profile, plan, checkpoint to resume, workers' fit), print the DeepSpeed config; start "
                       "nothing")
    train.set_defaults(handler=_train)
    _add_config_commands(commands)
    plan = _command(commands, "plan", help="make an offline memory plan (no GPU needed)",
                    description="longtrain plan [CONFIG.yaml] [key=value ...] [--profile NAME] "
                                "[--out plan.yaml]; e.g. longtrain plan configs/llama7b_1m_8xa800.yaml")
    plan.add_argument("args", nargs="*", metavar="CONFIG_OR_OVERRIDE")
    plan.add_argument("--profile", help="hardware profile name in profiles/hardware/ or a YAML path "
                                        "(default: metrics.hardware_profile of the config)")
    plan.add_argument("--out", help="plan file to write (default: plans/CONFIG_NAME.plan.yaml; PNG next to it)")
    plan.add_argument("--max-seq", action="store_true", help="print the longest data.seq_len that plans (or, with "
                      "train.activation_checkpointing=alst, that the ALST recipe fits) and what binds, in one line")
    plan.set_defaults(handler=_plan)
    bench = _command(commands, "bench", help="measure activation strategies side by side on this GPU",
                     description="longtrain bench [--layers 4] [--seq-lens 32768,65536,131072] "
                                 "[--modes ...] [--repeats 3] [--out DIR]")
    bench.add_argument("--layers", type=int, default=4, help="Llama-7B-shaped layers in the stack")
    bench.add_argument("--seq-lens", default="32768,65536,131072", help="comma-separated sequence lengths")
    bench.add_argument("--modes", default="store_all,full_recompute,deepspeed_cpu_ckpt,save_on_cpu,longtrain,"
                                          "longtrain_no_arena",
                       help="comma-separated, from: " + ",".join(BENCH_MODES) + " (default: %(default)s)")
    bench.add_argument("--repeats", type=int, default=3, help="timed steps per row (median reported)")
    bench.add_argument("--out", help="directory for the JSON, Markdown and PNG (default profiles/runs)")
    bench.add_argument("--profile", help="hardware profile for MFU and the plan (default: detected from the GPU)")
    bench.add_argument("--plan-fraction", type=float, help="GPU budget fraction for the longtrain plan "
                                                          "(default: plan.gpu_memory_fraction + the optimizer's share)")
    bench.add_argument("--policy", help="run the longtrain rows with one hand-written policy for every layer instead "
                                        "of the plan: KEEP/SWAP/RECOMPUTE fractions, '/host' to swap the skeletal "
                                        "tensors too (e.g. 0/1/0 swaps every token)")
    bench.add_argument("--swap-hidden", type=float, help="share of a neighbouring layer's compute a host copy hides "
                                                         "behind, for the plans the bench makes (calibration)")
    bench.add_argument("--trace", action="store_true", help="print a torch.profiler summary of one step of each "
                                                             "row (where the time goes)")
    bench.add_argument("--elementwise", choices=ELEMENTWISE, default="eager",
                       help="the layers' RMSNorm, RoPE and SwiGLU: op by op, or fused by torch.compile "
                            "(train.elementwise)")
    bench.add_argument("--attention-kernel", choices=ATTENTION_KERNELS, default="sdpa",
                       help="the layers' causal attention: PyTorch SDPA, FlashAttention-4 (the flash-attn-4 "
                            "package), or auto: the faster at each length by the profile (train.attention_kernel)")
    bench.add_argument("--allocator", choices=ALLOCATORS, default="caching",
                       help="device allocator: PyTorch's caching one, or planned: one step traced, its requests laid "
                            "out offline and later steps served at those offsets (MEMO's executor; train.allocator)")
    bench.set_defaults(handler=_bench)
    predictors = _command(commands, "train-predictors", help="fit token elimination's block-score predictors",
                          description="longtrain train-predictors [CONFIG.yaml] [key=value ...] "
                                      "[--steps 200] [--out PATH]")
    predictors.add_argument("args", nargs="*", metavar="CONFIG_OR_OVERRIDE")
    predictors.add_argument("--steps", type=int, default=200, help="optimizer steps (one micro-batch each)")
    predictors.add_argument("--out", help="file to write (default: next to model.init_from, else ./"
                                          "token_elim_predictors.pt)")
    predictors.set_defaults(handler=_train_predictors)
    prepare = _command(commands, "prepare-data", help="tokenize a jsonl / parquet / text source once (cached)",
                       description="longtrain prepare-data [CONFIG.yaml] [key=value ...] [--workers N]; e.g. "
                                   "longtrain prepare-data data.source=jsonl data.path='docs/*.jsonl' "
                                   "data.tokenizer=/models/Llama-3.2-1B")
    prepare.add_argument("args", nargs="*", metavar="CONFIG_OR_OVERRIDE")
    prepare.add_argument("--workers", type=int, help="tokenizing processes (default: the CPUs this process may use)")
    prepare.set_defaults(handler=_prepare_data)
    _add_export_command(commands)
    _add_eval_command(commands)
    _add_job_commands(commands)
    profile = _command(commands, "profile", help="reports on machines and runs (profile mfu RUN_DIR, "
                                                             "profile hardware, profile calibrate BENCH_JSON...)")
    profile_commands = profile.add_subparsers(dest="profile_command", required=True)
    mfu = _command(profile_commands, "mfu", help="MFU per node and per rank of a run: Markdown table and PNG")
    mfu.add_argument("run_dir")
    mfu.add_argument("--warmup-steps", type=int, default=3, help="logged steps up to this step are left out")
    mfu.set_defaults(handler=_profile_mfu)
    _add_profile_machine_commands(profile_commands)
    return parser


BENCH_MODES = ("store_all", "full_recompute", "deepspeed_cpu_ckpt", "save_on_cpu", "longtrain", "longtrain_no_arena",
               "mesa_int8", "s2a_int4", "wta_crs", "compressed", "compressed_swap", "token_elim",
               "longtrain_token_elim")
"""`bench --modes` choices for --help (launch.measure.bench.MODES, which imports torch; a test keeps them equal)."""


def _version() -> str:
    """The installed package's version (pyproject.toml's), or `unknown` when run from a tree not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("longtrain")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_config_commands(commands) -> None:
    """config show (the resolved job) and config diff (two configs or run directories)."""
    config = _command(commands, "config", help="show a resolved job config, or diff two (configs or run dirs)")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = _command(config_commands, "show", help="the resolved config as YAML, every default written out",
                    description="longtrain config show [CONFIG.yaml] [key=value ...]; e.g. longtrain config show "
                                "configs/default.yaml data.seq_len=512", epilog=_keys_help(),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("args", nargs="*", metavar="CONFIG_OR_OVERRIDE")
    show.set_defaults(handler=_config_show)
    diff = _command(config_commands, "diff", help="the keys whose resolved values differ, as `key: A -> B`",
                    description="longtrain config diff A B; each a config file (resolved with defaults) or a run "
                                "directory (its config.yaml, the newest after a resume)")
    diff.add_argument("first", metavar="A")
    diff.add_argument("second", metavar="B")
    diff.set_defaults(handler=_config_diff)


def _keys_help() -> str:
    from launch.config_command import keys_help

    return keys_help()


def _config_show(args: argparse.Namespace) -> int:
    from launch.config_command import run_config_show

    config_path, overrides = split_config_and_overrides(args.args)
    return run_config_show(config_path, overrides)


def _config_diff(args: argparse.Namespace) -> int:
    from launch.config_command import run_config_diff

    return run_config_diff(args.first, args.second)


def _command(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """A command's parser; every command takes `--debug`."""
    return subparsers.add_parser(name, parents=[DEBUG_FLAG], **kwargs)


def _add_profile_machine_commands(profile_commands) -> None:
    """profile hardware (measure this machine into a profile) and profile calibrate (fit it to bench runs)."""
    hardware = _command(
        profile_commands, "hardware", help="measure this machine (GPU or CPU) into a hardware profile YAML",
        description="longtrain profile hardware [CONFIG.yaml] [key=value ...] [--out profiles/hardware/NAME.yaml] "
                    "[--quick]; the layer measured has the config's model shape (default llama-7b on a GPU, debug "
                    "on CPU)")
    hardware.add_argument("args", nargs="*", metavar="CONFIG_OR_OVERRIDE")
    hardware.add_argument("--out", help="profile to write (default profiles/hardware/<detected>_measured.yaml)")
    hardware.add_argument("--quick", action="store_true", help="fewer sizes and repeats (about 20 s on a GPU)")
    hardware.add_argument("--force", action="store_true", help="replace a shipped profile in profiles/hardware/")
    hardware.set_defaults(handler=_profile_hardware)
    calibrate = _command(
        profile_commands, "calibrate",
        help="planner predictions vs longtrain bench measurements; fit the profile's factors",
        description="longtrain profile calibrate BENCH_JSON... [--profile NAME] [--out DIR]")
    calibrate.add_argument("bench_json", nargs="+", help="JSON files written by longtrain bench")
    calibrate.add_argument("--profile", help="profile the rows are predicted with (default: the JSON's meta.profile)")
    calibrate.add_argument("--out", default="profiles/runs", help="directory for the report and the calibrated "
                                                                 "profile (default profiles/runs)")
    calibrate.set_defaults(handler=_profile_calibrate)


def _add_export_command(commands) -> None:
    export = _command(commands, "export", help="write a run's checkpoint as a Hugging Face model directory",
                      description="longtrain export RUN_DIR[:TAG] OUT_DIR [--dtype bf16|fp32] [--overwrite]; the "
                                  "newest complete checkpoint unless TAG names one")
    export.add_argument("source", metavar="RUN_DIR[:TAG]")
    export.add_argument("out_dir", metavar="OUT_DIR")
    export.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weights' dtype (default bf16)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is a model directory")
    export.add_argument("--lora", choices=("adapter", "merged"), default="adapter", help="a LoRA run: a peft adapter "
                        "directory (default) or the base from model.init_from with the adapters merged in")
    export.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from launch.export_command import run_export

    return run_export(args.source, args.out_dir, args.dtype, args.overwrite, lora=args.lora)


def _add_eval_command(commands) -> None:
    evaluate = _command(commands, "eval", help="perplexity by position and passkey retrieval of models",
                        description="longtrain eval MODEL [MODEL ...] [CONFIG.yaml] [key=value ...] [--out DIR]; "
                                    "MODEL: a run directory (its newest complete checkpoint), RUN_DIR:TAG or a Hugging "
                                    "Face directory; e.g. longtrain eval runs/default-20261201-101500 "
                                    "eval.lengths=[1024,4096]")
    evaluate.add_argument("args", nargs="+", metavar="MODEL_CONFIG_OR_OVERRIDE")
    evaluate.add_argument("--out", help="directory for results.json, perplexity.png and passkey.png (default: "
                                        "RUN_DIR/eval of the first model, else ./eval/NAME)")
    evaluate.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    evaluate.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    from launch.eval_command import run_eval

    return run_eval(args.args, args.out, args.device)


def _add_job_commands(commands) -> None:
    """submit / status / logs / stop / jobs: the Ray Jobs API of a cluster (its dashboard URL)."""
    submit = _command(commands, "submit", help="submit the training job to a Ray cluster",
                      description="longtrain submit [CONFIG.yaml] [key=value ...] --address http://HEAD:8265 "
                                  "[--wait | --follow]; status exit codes: 0 succeeded or running, 1 failed, "
                                  "3 stopped")
    submit.add_argument("args", nargs="*", metavar="CONFIG_OR_OVERRIDE")
    submit.add_argument("--wait", action="store_true", help="return when the job ended, with status's exit code")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ended, then as --wait")
    for name, help_text in (("status", "a submitted job's state"), ("logs", "a submitted job's output"),
                            ("stop", "stop a submitted job; prints its run summary and the command that resumes it")):
        sub = _command(commands, name, help=help_text)
        sub.add_argument("job_id")
        if name == "logs":
            sub.add_argument("--follow", action="store_true", help="stream until the job ends")
        sub.set_defaults(handler=_job_command)
        _address(sub)
    jobs = _command(commands, "jobs", help="list the jobs of a Ray cluster")
    for sub in (submit, jobs):
        sub.set_defaults(handler=_job_command)
        _address(sub)


def _address(sub) -> None:
    sub.add_argument("--address", default=os.environ.get("RAY_ADDRESS_DASHBOARD", "http://127.0.0.1:8265"),
                     help="the cluster's dashboard URL (default $RAY_ADDRESS_DASHBOARD or http://127.0.0.1:8265)")


def _job_command(args: argparse.Namespace) -> int:
    from launch import jobs

    if args.command == "submit":
        config_path, overrides = split_config_and_overrides(args.args)
        return jobs.submit(config_path, overrides, args.address, wait=args.wait, follow=args.follow)
    if args.command == "jobs":
        return jobs.list_jobs(args.address)
    if args.command == "logs":
        return jobs.logs(args.job_id, args.address, args.follow)
    return {"status": jobs.status, "stop": jobs.stop}[args.command](args.job_id, args.address)


def split_config_and_overrides(args: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """The first argument without '=' is the config file; the rest are key=value overrides."""
    config = [a for a in args if "=" not in a]
    if len(config) > 1:
        raise LongtrainError(f"more than one config file given ({', '.join(config)}); pass one YAML file and "
                             "key=value overrides")
    return (config[0] if config else None), [a for a in args if "=" in a]


def _train(args: argparse.Namespace) -> int:
    from launch import api  # heavy imports (ray, torch) only when a function needs them

    config_path, overrides = split_config_and_overrides(args.args)
    if args.dry_run:
        print(api.dry_run(config_path, overrides).summary)
        return 0
    return api.train(config_path, overrides).exit_code


def _plan(args: argparse.Namespace) -> int:
    from launch import api

    config_path, overrides = split_config_and_overrides(args.args)
    if args.max_seq:
        print(api.longest_sequence(config_path, overrides, profile=args.profile).summary)
    else:
        print(api.plan(config_path, overrides, profile=args.profile, out=args.out).summary)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from launch.bench_command import run_bench_command

    try:
        seq_lens = [int(x) for x in args.seq_lens.split(",") if x]
    except ValueError as error:
        raise LongtrainError(f"--seq-lens {args.seq_lens!r} must be comma-separated integers, e.g. "
                             "32768,65536") from error
    return run_bench_command(args.layers, seq_lens, args.modes.split(","), args.repeats, args.out, args.profile,
                             args.plan_fraction, args.trace, args.policy,
                             args.swap_hidden, args.elementwise, args.attention_kernel, args.allocator)


def _prepare_data(args: argparse.Namespace) -> int:
    from launch.prepare_command import run_prepare_data

    config_path, overrides = split_config_and_overrides(args.args)
    return run_prepare_data(config_path, overrides, args.workers)


def _train_predictors(args: argparse.Namespace) -> int:
    from launch.predictors_command import run_train_predictors

    config_path, overrides = split_config_and_overrides(args.args)
    return run_train_predictors(config_path, overrides, args.steps, args.out)


def _profile_mfu(args: argparse.Namespace) -> int:
    from launch.profile_command import run_profile_mfu

    return run_profile_mfu(args.run_dir, args.warmup_steps)


def _profile_hardware(args: argparse.Namespace) -> int:
    from launch.profile_hardware_command import run_profile_hardware

    config_path, overrides = split_config_and_overrides(args.args)
    return run_profile_hardware(config_path, overrides, args.out, args.quick, args.force)


def _profile_calibrate(args: argparse.Namespace) -> int:
    from launch.calibrate_command import run_profile_calibrate

    return run_profile_calibrate(args.bench_json, args.profile, args.out)


if __name__ == "__main__":
    sys.exit(main())
