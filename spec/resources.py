"""Where the shipped job configs and hardware profiles are found, in a source checkout and in an installed wheel.

Why links: the design keeps `configs/` and `profiles/hardware/` at the top of the repository, where people read
and edit them, while an installed package can only find files inside itself. `spec/shipped/` holds two links to
those folders; building a wheel copies the files they point to, so one path works in both installs.
"""

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
CONFIGS_DIR = SHIPPED_DIR / "configs"
"""The shipped job configs (`configs/` of the repository)."""
HARDWARE_PROFILES_DIR = SHIPPED_DIR / "hardware"
"""The shipped hardware profiles (`profiles/hardware/` of the repository)."""
