"""OLLAMA_HOST, OLLAMA_PORT, OLLAMA_KEEP_ALIVE and OLLAMA_THINK as Ollama's users write them.

The forms are those of Ollama's own `envconfig.Host`/`envconfig.KeepAlive`
(and their tests); the settings are read from the environment, as the worker
reads them, and a value the worker cannot use stops it with exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from config.ollama_env import parse_keep_alive, parse_ollama_host, parse_think
from config.settings import Settings, SettingsError, load_settings
from tests.worker_process import run_cli, worker_env


def settings_from_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name in ("OLLAMA_HOST", "OLLAMA_PORT", "OLLAMA_USE_TLS", "OLLAMA_KEEP_ALIVE",
                 "OLLAMA_THINK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(_env_file=None)


@pytest.mark.parametrize(("env", "url"), [
    # Ollama's CLI and docs: host:port (the form that once became ...:11434:11434)
    ({"OLLAMA_HOST": "127.0.0.1:11434"}, "http://127.0.0.1:11434"),
    ({"OLLAMA_HOST": "gpu-box:11500"}, "http://gpu-box:11500"),
    ({"OLLAMA_HOST": "gpu-box"}, "http://gpu-box:11434"),
    ({"OLLAMA_HOST": "gpu-box", "OLLAMA_PORT": "11500"}, "http://gpu-box:11500"),
    ({"OLLAMA_HOST": "gpu-box", "OLLAMA_USE_TLS": "true"}, "https://gpu-box:11434"),
    ({"OLLAMA_HOST": "http://gpu-box:11434"}, "http://gpu-box:11434"),
    ({"OLLAMA_HOST": "http://gpu-box:11434/"}, "http://gpu-box:11434"),
    # A scheme without a port: the scheme's port, as for Ollama's CLI...
    ({"OLLAMA_HOST": "http://gpu-box"}, "http://gpu-box:80"),
    ({"OLLAMA_HOST": "https://ollama.example.com/ollama"}, "https://ollama.example.com:443/ollama"),
    # ...unless OLLAMA_PORT says otherwise (it fills in what the host leaves open).
    ({"OLLAMA_HOST": "https://gpu-box", "OLLAMA_PORT": "8443"}, "https://gpu-box:8443"),
    # The same port in both is no conflict.
    ({"OLLAMA_HOST": "gpu-box:11500", "OLLAMA_PORT": "11500"}, "http://gpu-box:11500"),
    ({"OLLAMA_HOST": "HTTPS://gpu-box:8443", "OLLAMA_USE_TLS": "true"}, "https://gpu-box:8443"),
    # IPv6, with and without brackets and port
    ({"OLLAMA_HOST": "[::1]:11434"}, "http://[::1]:11434"),
    ({"OLLAMA_HOST": "[::1]"}, "http://[::1]:11434"),
    ({"OLLAMA_HOST": "::1"}, "http://[::1]:11434"),
    ({"OLLAMA_HOST": "[::1]:1337"}, "http://[::1]:1337"),
    ({"OLLAMA_HOST": "http://[fe80::1]:8080"}, "http://[fe80::1]:8080"),
    # A server's bind address, or only a port: this machine, so loopback.
    ({"OLLAMA_HOST": ":11434"}, "http://127.0.0.1:11434"),
    ({"OLLAMA_HOST": ":1234"}, "http://127.0.0.1:1234"),
    ({"OLLAMA_HOST": "0.0.0.0"}, "http://127.0.0.1:11434"),
    ({"OLLAMA_HOST": "0.0.0.0:11434"}, "http://127.0.0.1:11434"),
    ({"OLLAMA_HOST": "[::]"}, "http://[::1]:11434"),
    # Spaces and quotes, as Ollama's envconfig.Var strips them
    ({"OLLAMA_HOST": ' "1.2.3.4" '}, "http://1.2.3.4:11434"),
    ({"OLLAMA_HOST": "'1.2.3.4:99'"}, "http://1.2.3.4:99"),
    # The defaults
    ({}, "http://localhost:11434"),
])
def test_ollama_host_in_every_form_ollama_accepts(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str
) -> None:
    assert settings_from_env(monkeypatch, **env).ollama_base_url == url


@pytest.mark.parametrize(("env", "names", "words"), [
    ({"OLLAMA_HOST": "127.0.0.1:11434", "OLLAMA_PORT": "11500"},
     ("OLLAMA_HOST", "OLLAMA_PORT"), ("11434", "11500")),
    ({"OLLAMA_HOST": "http://gpu-box:11434", "OLLAMA_PORT": "80"},
     ("OLLAMA_HOST", "OLLAMA_PORT"), ("11434", "80")),
    ({"OLLAMA_HOST": "http://gpu-box", "OLLAMA_USE_TLS": "true"},
     ("OLLAMA_HOST", "OLLAMA_USE_TLS"), ("http://",)),
    ({"OLLAMA_HOST": "https://gpu-box", "OLLAMA_USE_TLS": "false"},
     ("OLLAMA_HOST", "OLLAMA_USE_TLS"), ("https://",)),
    ({"OLLAMA_HOST": "127.0.0.1:99999"}, ("OLLAMA_HOST",), ("99999",)),
    ({"OLLAMA_HOST": "127.0.0.1:port"}, ("OLLAMA_HOST",), ("port",)),
    ({"OLLAMA_HOST": "unix:///tmp/ollama.sock"}, ("OLLAMA_HOST",), ("unix",)),
    ({"OLLAMA_HOST": "gpu box"}, ("OLLAMA_HOST",), ("gpu box",)),
    ({"OLLAMA_HOST": "[::1"}, ("OLLAMA_HOST",), ("[",)),
    ({"OLLAMA_HOST": "user:pw@gpu-box"}, ("OLLAMA_HOST",), ("credentials",)),
    ({"OLLAMA_PORT": "70000"}, ("OLLAMA_PORT",), ()),
])
def test_an_address_the_worker_cannot_use_is_a_clear_start_up_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: tuple[str, ...],
    words: tuple[str, ...],
) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_from_env(monkeypatch, **env)
    message = str(caught.value)
    for expected in (*names, *words):
        assert expected in message


async def test_a_port_conflict_exits_2_naming_both_variables_and_no_secret(
    tmp_path: Path,
) -> None:
    """As the operator meets it: `waddle-ai run` refuses to start, and says why."""
    env = worker_env(OLLAMA_HOST="127.0.0.1:11434", OLLAMA_PORT="11500", AI_PROVIDER="ollama",
                     WADDLEAI_API_KEY="sk-never-printed")
    code, out, err = await run_cli("run", env=env, cwd=tmp_path, timeout_s=60)
    assert code == 2, (out, err)
    assert "OLLAMA_HOST" in err
    assert "OLLAMA_PORT" in err
    assert "sk-never-printed" not in out + err


@pytest.mark.parametrize(("value", "sent"), [
    ("30m", "30m"), ("5m", "5m"), ("1h30m", "1h30m"), ("300ms", "300ms"), ("1.5h", "1.5h"),
    ("-1m", "-1m"), ("2h45m10s", "2h45m10s"), ("0", 0),
    # Seconds are numbers: the JSON string "-1" would be refused by Ollama.
    ("-1", -1), ("3600", 3600), ("60", 60), (' "3600" ', 3600),
])
def test_keep_alive_goes_out_as_ollama_reads_it(
    monkeypatch: pytest.MonkeyPatch, value: str, sent: str | int
) -> None:
    settings = settings_from_env(monkeypatch, OLLAMA_KEEP_ALIVE=value)
    assert settings.ollama_keep_alive_value == sent
    assert type(settings.ollama_keep_alive_value) is type(sent)


@pytest.mark.parametrize("value", ["1d", "1w", "abc", "1.5", "5 m", "m", "", "3600s5"])
def test_a_keep_alive_ollama_cannot_read_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    with pytest.raises(SettingsError, match="OLLAMA_KEEP_ALIVE"):
        settings_from_env(monkeypatch, OLLAMA_KEEP_ALIVE=value)


@pytest.mark.parametrize(("value", "think"), [
    ("false", False), ("true", True), ("0", False), ("1", True), ("no", False), ("on", True),
    ("low", "low"), ("Medium", "medium"), ("HIGH", "high"),
])
def test_think_is_a_boolean_or_a_level(
    monkeypatch: pytest.MonkeyPatch, value: str, think: bool | str
) -> None:
    assert settings_from_env(monkeypatch, OLLAMA_THINK=value).ollama_think == think


def test_think_is_off_by_default_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_env(monkeypatch).ollama_think is False
    with pytest.raises(SettingsError, match="OLLAMA_THINK"):
        settings_from_env(monkeypatch, OLLAMA_THINK="maybe")


def test_parsers_name_what_is_wrong() -> None:
    assert parse_ollama_host("gpu:1").port == 1
    assert parse_ollama_host("https://x").scheme == "https"
    assert parse_keep_alive("+5m") == "+5m"
    assert parse_think(True) is True
    with pytest.raises(ValueError, match="1 to 65535"):
        parse_ollama_host("gpu:0")
