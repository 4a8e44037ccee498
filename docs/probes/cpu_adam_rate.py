"""Build DeepSpeed's CPU Adam if needed, then measure it as `longtrain profile hardware` does (which skips it when
the op was never built): `cpu_adam_params_per_second` for a hardware profile."""
import time
from deepspeed.ops.op_builder import CPUAdamBuilder
t = time.time(); CPUAdamBuilder().load(); print(f"cpu_adam built in {time.time() - t:.1f} s", flush=True)
from launch.measure.hardware import Measurement, measure_cpu_adam
from launch.profile_hardware_command import CPU_ADAM_PARAMS
m = Measurement()
for repeats in (5, 5):
    measure_cpu_adam(m, CPU_ADAM_PARAMS, repeats)
    print("cpu_adam_params_per_second", m.measured["cpu_adam_params_per_second"], "params", CPU_ADAM_PARAMS, flush=True)
