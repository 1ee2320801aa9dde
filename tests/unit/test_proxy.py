"""Which proxy an OKX URL goes through: the setting, else HTTPS_PROXY/HTTP_PROXY/ALL_PROXY and NO_PROXY."""

from __future__ import annotations

import pytest

from ingest.config import load_settings
from ingest.errors import ConfigError
from ingest.io.proxy import describe_proxy, proxy_for

CORP = "http://proxy.corp:3128"


def test_the_setting_wins_over_the_environment_and_direct_means_none() -> None:
    env = {"HTTPS_PROXY": "http://other:8080"}
    assert proxy_for("wss://ws.okx.com:8443/ws/v5/public", CORP, env) == CORP
    assert proxy_for("https://www.okx.com", "direct", env) is None


@pytest.mark.parametrize(("url", "env", "expected"), [
    ("wss://ws.okx.com:8443/ws/v5/public", {"HTTPS_PROXY": CORP}, CORP),
    ("https://www.okx.com", {"https_proxy": CORP, "HTTPS_PROXY": "http://upper:1"}, CORP),
    ("ws://127.0.0.1:8765/ws/v5/public", {"HTTPS_PROXY": CORP}, None),
    ("ws://127.0.0.1:8765/ws/v5/public", {"HTTP_PROXY": CORP}, CORP),
    ("https://www.okx.com", {"ALL_PROXY": CORP}, CORP),
    ("https://www.okx.com", {}, None),
    ("https://www.okx.com", {"HTTPS_PROXY": CORP, "NO_PROXY": "okx.com"}, None),
    ("https://www.okx.com", {"HTTPS_PROXY": CORP, "NO_PROXY": ".okx.com"}, None),
    ("https://www.okx.com", {"HTTPS_PROXY": CORP, "NO_PROXY": "notokx.com, example.org"}, CORP),
    ("wss://ws.okx.com:8443/x", {"HTTPS_PROXY": CORP, "NO_PROXY": "ws.okx.com:8443"}, None),
    ("wss://ws.okx.com:8443/x", {"HTTPS_PROXY": CORP, "NO_PROXY": "ws.okx.com:443"}, CORP),
    ("https://www.okx.com", {"HTTPS_PROXY": CORP, "no_proxy": "*"}, None),
])
def test_the_environment_decides_like_curl(url: str, env: dict[str, str], expected: str | None) -> None:
    assert proxy_for(url, None, env) == expected


def test_logs_show_the_proxy_without_its_password() -> None:
    assert describe_proxy("http://user:hunter2@proxy.corp:3128") == "http://proxy.corp:3128"


def test_a_proxy_setting_that_is_not_a_url_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, okx={"proxy": "proxy.corp:3128"})
    assert err.value.key == "okx.proxy"
