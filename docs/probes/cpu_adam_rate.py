"""Build DeepSpeed's CPU Adam if needed, then measure it as `longtrain profile hardware` does (which skips it when
the op was never built): `cpu_adam_params_per_second` for a hardware profile. Two measurements, to see the spread."""

import time

from deepspeed.ops.op_builder import CPUAdamBuilder

from launch.measure.hardware import Measurement, measure_cpu_adam
from launch.profile_hardware_command import CPU_ADAM_PARAMS


def main() -> None:
    started = time.time()
    CPUAdamBuilder().load()
    print(f"cpu_adam built in {time.time() - started:.1f} s", flush=True)
    measurement = Measurement()
    for _ in range(2):
        measure_cpu_adam(measurement, CPU_ADAM_PARAMS, repeats=5)
        print("cpu_adam_params_per_second", measurement.measured["cpu_adam_params_per_second"], "params",
              CPU_ADAM_PARAMS, flush=True)


if __name__ == "__main__":
    main()
