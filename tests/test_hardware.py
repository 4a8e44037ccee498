"""Hardware profiles: every shipped profile loads; malformed ones fail with the file and key."""

import pytest

from spec.hardware import PROFILES_DIR, detect_profile_name, load_profile
from spec.errors import ProfileError


@pytest.mark.parametrize("name", ["h100_sxm", "h200", "a100_80g", "a800", "cpu"])
def test_shipped_profiles_load(name):
    profile = load_profile(name)
    assert profile.peak_bf16_tflops > 0 and profile.source


def test_h100_profile_carries_the_measured_rates():
    measured = load_profile("h100_sxm").measured
    assert measured.attention_fwd_bwd_tflops_by_seq_len[32768] == 560.0
    assert measured.pcie_pinned_gbps_each_way == 55.0


def test_unknown_key_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((PROFILES_DIR / "cpu.yaml").read_text() + "peak_tflops_typo: 3\n")
    with pytest.raises(ProfileError, match="peak_tflops_typo"):
        load_profile(path)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ProfileError, match="h100_sxm"):
        load_profile("tpu_v5")


def test_device_names_map_to_profiles():
    assert detect_profile_name("NVIDIA H100 80GB HBM3") == "h100_sxm"
    assert detect_profile_name("NVIDIA H200") == "h200"
    assert detect_profile_name(None) == "cpu"
