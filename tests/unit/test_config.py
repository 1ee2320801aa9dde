"""Configuration errors name the key and the fix; credentials never come from the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.config import DEFAULT_INSTRUMENTS, load_settings, require_subscriptions
from ingest.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_use_the_embedded_broker_without_idempotence() -> None:
    s = load_settings()
    assert s.kafka.embedded and s.kafka.idempotence is False


def test_real_kafka_turns_idempotence_on_by_default(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, '[kafka]\nbootstrap_servers = "k1:9092,k2:9092"\n'))
    assert s.kafka.idempotence is True


@pytest.mark.parametrize(
    ("text", "key", "fix"),
    [
        ('[kafka]\ncompresion = "zstd"\n', "kafka.compresion", "spelling"),
        ('[kafka]\ncompression = "brotli"\n', "kafka.compression", "'zstd'"),
        ('[ws]\nkeepalive_s = 45\n', "ws.keepalive_s", "README"),
        ('[okx]\napi_key = "x"\n', "okx.api_key", "OKX_API_KEY"),
        ('[[okx.subscriptions]]\nchannel = "tradez"\ninst_id = "BTC-USDT"\n', "okx.subscriptions.0",
         "did you mean 'trades'"),
        ('[[okx.subscriptions]]\nchannel = "orders"\n', "okx.subscriptions.0", "README"),
        ('[kafka]\nwire_format = "confluent"\n', "kafka", "README"),
        ('[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_password = "x"\n', "kafka.sasl_password",
         "KAFKA_SASL_PASSWORD"),
        ('[kafka]\nschema_registry_token = "x"\n', "kafka.schema_registry_token", "SCHEMA_REGISTRY_TOKEN"),
        ('[kafka]\nssl_key_password = "x"\n', "kafka.ssl_key_password", "KAFKA_SSL_KEY_PASSWORD"),
        ('[kafka]\nsasl_oauth_client_secret = "x"\n', "kafka.sasl_oauth_client_secret", "KAFKA_OAUTH_CLIENT_SECRET"),
        ('[kafka]\nssl_certfile = "c.pem"\n', "kafka", "SSL or SASL_SSL"),
        ('[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "SCRAM-SHA-1"\n', "kafka.sasl_mechanism",
         "'SCRAM-SHA-512'"),
        ('[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "OAUTHBEARER"\nsasl_oauth_provider = "oidc"\n',
         "kafka", "sasl_oauth_token_url"),
        ('shard = "\u00e9ast"\n', "shard", "ASCII letters"),
    ],
)
def test_bad_config_names_key_and_fix(tmp_path: Path, text: str, key: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, text))
    assert err.value.key == key
    assert fix in str(err.value)


@pytest.mark.parametrize(("section", "high", "low"), [
    ("okx", "auth_pause_max_s", "auth_pause_initial_s"),
    ("ws", "backoff_max_s", "backoff_min_s"),
    ("kafka", "delivery_timeout_ms", "request_timeout_ms"),
    ("backfill", "retry_max_s", "retry_initial_s"),
    ("archive", "retry_max_s", "retry_initial_s"),
])
def test_a_ceiling_below_its_start_is_refused_and_an_equal_one_accepted(
        tmp_path: Path, section: str, high: str, low: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, f"[{section}]\n{high} = 5\n{low} = 6\n"))
    assert err.value.key == section
    assert f"{high} must be >= {low}" in str(err.value)
    load_settings(_write(tmp_path, f"[{section}]\n{high} = 6\n{low} = 6\n"))


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OKX_INGEST__KAFKA__TOPIC_PREFIX", "prod.okx.")
    s = load_settings(_write(tmp_path, '[kafka]\ntopic_prefix = "file."\n'))
    assert s.kafka.topic_prefix == "prod.okx."


def test_instruments_shorthand_expands_without_duplicates(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, '[okx]\ninstruments = ["BTC-USDT"]\nchannels = ["trades", "books"]\n'
                                       '[[okx.subscriptions]]\nchannel = "trades"\ninst_id = "BTC-USDT"\n'))
    assert [(x.channel, x.inst_id) for x in s.okx.all_subscriptions()] == [
        ("trades", "BTC-USDT"), ("books", "BTC-USDT")]


def test_shipped_default_config_is_valid() -> None:
    s = load_settings(Path(__file__).resolve().parents[2] / "config" / "okx-ingest.toml")
    assert len(s.okx.all_subscriptions()) >= 3


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("variable", "value", "instruments", "channels"),
    [
        ("OKX_INGEST__OKX__INSTRUMENTS", "BTC-USDT", ["BTC-USDT"], ["trades", "books", "tickers"]),
        ("OKX_INGEST__OKX__INSTRUMENTS", " BTC-USDT, ETH-USDT ,", ["BTC-USDT", "ETH-USDT"],
         ["trades", "books", "tickers"]),
        ("OKX_INGEST__OKX__CHANNELS", "trades,books", list(DEFAULT_INSTRUMENTS), ["trades", "books"]),
        ("OKX_INGEST__OKX__CHANNELS", '["trades", "candle1m"]', list(DEFAULT_INSTRUMENTS), ["trades", "candle1m"]),
    ],
)
def test_lists_from_the_environment_take_the_plain_comma_form_or_json(
        monkeypatch: pytest.MonkeyPatch, variable: str, value: str, instruments: list[str],
        channels: list[str]) -> None:
    monkeypatch.setenv(variable, value)
    okx = load_settings().okx
    assert (okx.instruments, okx.channels) == (instruments, channels)


def test_a_config_without_instruments_records_the_three_the_readme_promises(tmp_path: Path) -> None:
    okx = load_settings(_write(tmp_path, "[okx]\nprivate = false\n")).okx
    assert okx.instruments == list(DEFAULT_INSTRUMENTS) and len(DEFAULT_INSTRUMENTS) == 3
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [row] = [line for line in readme.splitlines() if line.startswith("| `okx.instruments`")]
    assert all(f"`{inst}`" in row for inst in DEFAULT_INSTRUMENTS)
    assert {(s.channel, s.inst_id) for s in okx.all_subscriptions()} == {
        (ch, inst) for inst in DEFAULT_INSTRUMENTS for ch in ("trades", "books", "tickers")}


def test_nothing_to_subscribe_is_refused_naming_the_key(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, "[okx]\ninstruments = []\n"))
    with pytest.raises(ConfigError) as err:
        require_subscriptions(settings)
    assert err.value.key == "okx.instruments"
    require_subscriptions(load_settings(_write(tmp_path, "[okx]\ninstruments = []\nprivate = true\n")))


def test_a_utf8_bom_in_the_config_file_is_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[okx]\ninstruments = ["ETH-USDT"]\n')
    assert load_settings(path).okx.instruments == ["ETH-USDT"]
