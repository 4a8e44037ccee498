"""`submit` and the other Jobs commands warn, in one line on stderr, before the Ray token travels unencrypted to
another machine (http:// to a non-loopback address); loopback and https:// stay quiet. No cluster is needed: the
address is this machine's own network address on a closed port, so the client fails right after the warning."""

import ipaddress

import psutil
import pytest

from launch.cli import main
from launch.jobs import plain_http_warning


def _own_network_address() -> str:
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family.name == "AF_INET" and not ipaddress.ip_address(entry.address).is_loopback:
                return entry.address
    pytest.skip("this machine has no non-loopback IPv4 address")


def test_a_token_over_plain_http_to_another_host_is_one_warning_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-token-for-the-test")
    address = f"http://{_own_network_address()}:9"
    code = main(["submit", f"run.root={tmp_path}", "--address", address])
    err = capsys.readouterr().err.strip().splitlines()
    print("\n".join(err))
    assert code == 2 and len(err) == 2
    assert err[0].startswith("longtrain: warning: the Ray token goes to " + address + " over plain http")
    assert "secret-token" not in "\n".join(err)


@pytest.mark.parametrize("address, token, warned", [
    ("http://10.1.2.3:8265", True, True), ("http://head.example.org:8265", True, True),
    ("https://10.1.2.3:8265", True, False), ("http://127.0.0.1:8265", True, False),
    ("http://localhost:8265", True, False), ("http://[::1]:8265", True, False), ("http://10.1.2.3:8265", False, False),
])
def test_only_plain_http_to_another_machine_with_a_token_warns(address, token, warned):
    assert bool(plain_http_warning(address, token)) == warned
