"""longtrain as a library: the functions behind the `longtrain` commands, for notebooks and other launchers.

    import longtrain

    job = longtrain.load_config("configs/default.yaml", ["data.seq_len=512"])   # longtrain config show
    planned = longtrain.plan("configs/llama7b4l_128k_1xh100.yaml")            # longtrain plan
    print(planned.plan.predicted["peak_gpu_gib"], planned.plan_path)
    checked = longtrain.dry_run(None, ["data.seq_len=512"])                   # longtrain train --dry-run
    result = longtrain.train(None, ["train.max_steps=50"])                    # longtrain train
    print(result.exit_code, result.summary.last_loss, result.resume_command)

The CLI calls these same functions (`launch.api`) and prints their `summary`; errors in the input raise
`LongtrainError` with the one line the CLI prints.
"""

from launch.api import (DryRunResult, LongestResult, PlanResult, TrainResult, dry_run, load_config, longest_sequence,
                        plan, train)
from spec.errors import LongtrainError

__all__ = ["load_config", "plan", "longest_sequence", "dry_run", "train", "PlanResult", "LongestResult",
           "DryRunResult", "TrainResult", "LongtrainError"]
