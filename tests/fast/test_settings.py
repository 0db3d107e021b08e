"""Settings from the environment and from a TOML file, through the one registry."""

from __future__ import annotations

import re
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from goldclone import settings_sources
from goldclone.settings import Settings
from goldclone.settings_sources import (
    CONFIG_VARIABLE,
    SETTINGS,
    SettingsError,
    describe_settings,
)

OPERATIONS = Path(__file__).parents[2] / "docs" / "operations.md"
TOKEN = "a-token-of-sixteen-or-more"


def _load(tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> Settings:
    config = tmp_path / "goldclone.toml"
    config.write_text(toml)
    return settings_sources.load(config, env or {})


def _error(tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(SettingsError) as caught:
        _load(tmp_path, toml, env)
    return str(caught.value)


@pytest.mark.parametrize(
    ("key", "toml", "text"),
    [
        ("port", "8080", "8080"),
        ("allow_no_lease", "true", "yes"),
        ("api_tokens", f'["{TOKEN}"]', TOKEN),
        ("callback_schedule", "[0, 5, 60.5]", "0,5,60.5"),
        ("vmware_lease_files", '["/a.leases", "/b.leases"]', "/a.leases:/b.leases"),
        ("nat_subnet", '"10.9.0.0/24"', "10.9.0.0/24"),
        ("ip_timeout", "7.5", "7.5"),
        ("qemu_user", '"none"', "none"),
    ],
)
def test_a_file_takes_toml_types_and_the_variables_text_alike(
    tmp_path: Path, key: str, toml: str, text: str
) -> None:
    variable = next(setting.variable for setting in SETTINGS if setting.key == key)
    from_types = _load(tmp_path, f"{key} = {toml}\n")
    from_text = _load(tmp_path, f"{key} = {text!r}\n")
    from_env = settings_sources.from_env({variable: text})
    assert from_types == from_text == from_env != settings_sources.from_env({})


def test_every_setting_with_a_variable_can_be_set_in_the_file(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        'host = "0.0.0.0"\nport = 8080\nnat_bridge = "natbr"\nmax_cpus = 3\nvmrun = "/opt/vmrun"\n'
        'total_memory = 4096\ndriver = "synthetic"\n',
    )
    assert (settings.host, settings.port, settings.driver) == ("0.0.0.0", 8080, "synthetic")
    assert settings.network.nat_bridge == "natbr" and settings.vmware.vmrun == "/opt/vmrun"
    assert (settings.limits.max_cpus, settings.limits.total_memory_mb) == (3, 4096)


def test_the_environment_wins_over_the_file_which_wins_over_the_defaults(tmp_path: Path) -> None:
    settings = _load(
        tmp_path, 'port = 8080\nnat_subnet = "10.9.0.0/24"\n', {"PORT": "9090", "PATH": "/bin"}
    )
    assert settings.port == 9090
    assert settings.network.nat_subnet == IPv4Network("10.9.0.0/24")
    assert settings.host == Settings().host


def test_goldclone_config_names_the_file_unless_one_is_given(tmp_path: Path) -> None:
    named, given = tmp_path / "named.toml", tmp_path / "given.toml"
    named.write_text("port = 1111\n")
    given.write_text("port = 2222\n")
    assert settings_sources.load(env={CONFIG_VARIABLE: str(named)}).port == 1111
    assert settings_sources.load(given, {CONFIG_VARIABLE: str(named)}).port == 2222
    assert settings_sources.load(env={}).port == Settings().port


def test_an_unknown_key_is_named_with_the_file_and_a_suggestion(tmp_path: Path) -> None:
    message = _error(tmp_path, 'nat_subnett = "10.9.0.0/24"\n')
    assert str(tmp_path / "goldclone.toml") in message
    assert "'nat_subnett'" in message and "did you mean nat_subnet?" in message
    assert "did you mean port?" in _error(tmp_path, "GOLDCLONE_PORT = 1\n")
    assert "unknown key 'network'" in _error(tmp_path, '[network]\nnat_bridge = "x"\n')


def test_a_bad_value_names_the_file_the_key_and_the_reason(tmp_path: Path) -> None:
    message = _error(tmp_path, 'port = "twelve"\n')
    assert message == f"{tmp_path / 'goldclone.toml'}: port = 'twelve': must be a whole number"
    assert "port = True: must be a whole number" in _error(tmp_path, "port = true\n")
    assert "must be 0 to 65535" in _error(tmp_path, "port = 70000\n")
    assert "nat_subnet = '10.0.0.0/25': is too small" in _error(
        tmp_path, 'nat_subnet = "10.0.0.0/25"\n'
    )
    assert "must be one of qemu, vmware, synthetic" in _error(tmp_path, 'driver = "kvm"\n')


def test_a_bad_variable_names_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"^PORT='twelve': must be a whole number$"):
        settings_sources.from_env({"PORT": "twelve"})
    with pytest.raises(ValueError, match="GOLDCLONE_IP_TIMEOUT='-1': must be"):
        settings_sources.from_env({"GOLDCLONE_IP_TIMEOUT": "-1"})
    assert settings_sources.from_env({"PORT": ""}).port == Settings().port  # empty is unset


def test_a_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    message = _error(tmp_path, 'host = "127.0.0.1"\nport = \n')
    assert message.startswith(f"{tmp_path / 'goldclone.toml'}: not valid TOML")
    assert "line 2" in message


def test_an_unreadable_file_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"missing\.toml: cannot read it"):
        settings_sources.load(tmp_path / "missing.toml", {})
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(SettingsError, match="not UTF-8"):
        settings_sources.load(tmp_path / "binary.toml", {})


def test_a_check_across_settings_is_a_settings_error(tmp_path: Path) -> None:
    message = _error(tmp_path, "default_ttl = 100\nmax_ttl = 50\n")
    assert "GOLDCLONE_DEFAULT_TTL (100) is above GOLDCLONE_MAX_TTL (50)" in message
    assert "must not overlap" in _error(tmp_path, 'hostonly_subnet = "192.168.123.0/24"\n')


SECRET = "hunter2-but-a-secret"
SECRET_KEYS = [setting.key for setting in SETTINGS if setting.secret]


def test_the_secrets_are_the_tokens_the_two_secrets_and_the_database_url() -> None:
    assert set(SECRET_KEYS) == {
        "api_tokens", "metrics_tokens", "tokens", "callback_secret", "fleet_secret",
        "database_url", "registry_credentials",
    }  # fmt: skip


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_a_bad_secret_in_a_file_is_never_shown(tmp_path: Path, key: str) -> None:
    message = _error(tmp_path, f'{key} = {{ value = "{SECRET}" }}\n')
    assert key in message and SECRET not in message
    unterminated = _error(tmp_path, f'{key} = "{SECRET}\n')
    assert "line 1" in unterminated and SECRET not in unterminated


@pytest.mark.parametrize("variable", ["GOLDCLONE_API_TOKENS", "GOLDCLONE_METRICS_TOKENS"])
def test_a_too_short_token_is_never_shown(variable: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_sources.from_env({variable: f"{TOKEN},short-one"})
    assert str(caught.value) == f"{variable}: each token needs at least 16 characters"


def test_a_database_url_sqlalchemy_cannot_parse_is_refused_without_its_password() -> None:
    with pytest.raises(SettingsError) as caught:
        settings_sources.from_env({"GOLDCLONE_DATABASE_URL": f"goldclone:{SECRET}@db/goldclone"})
    assert str(caught.value).startswith("GOLDCLONE_DATABASE_URL: must be an SQLAlchemy URL")
    assert SECRET not in str(caught.value)
    url = "postgresql+asyncpg://goldclone:pw@db/goldclone"
    assert settings_sources.from_env({"GOLDCLONE_DATABASE_URL": url}).db_url == url


def test_the_settings_repr_leaves_the_secrets_out() -> None:
    settings = settings_sources.from_env(
        {
            "GOLDCLONE_API_TOKENS": TOKEN,
            "GOLDCLONE_METRICS_TOKENS": SECRET,
            "GOLDCLONE_CALLBACK_SECRET": SECRET,
            "GOLDCLONE_DATABASE_URL": f"postgresql+asyncpg://goldclone:{SECRET}@db/goldclone",
        }
    )
    assert settings.api_tokens == (TOKEN,)
    assert TOKEN not in repr(settings) and SECRET not in repr(settings)


def test_every_setting_is_described_with_its_variable_key_default_and_help() -> None:
    described = describe_settings()
    assert [d.variable for d in described] == [setting.variable for setting in SETTINGS]
    assert len({d.key for d in described}) == len(described)
    for d in described:
        assert d.key == d.variable.removeprefix("GOLDCLONE_").lower()
        assert d.default and d.help and "\n" not in d.help
    by_key = {d.key: d for d in described}
    assert by_key["port"].default == "12345" and by_key["nat_subnet"].default == "192.168.123.0/24"
    assert by_key["callback_schedule"].default == "0,5,300,1800,7200,18000,36000,36000"
    assert by_key["allow_private_urls"].default == "true"
    assert by_key["api_tokens"].default == "unset"


def settings_table() -> str:
    """The table of docs/operations.md, as the registry has it."""
    rows = [f"| `{d.key}` | `{d.variable}` | {d.default} | {d.help} |" for d in describe_settings()]
    return "\n".join(["| key | variable | default | meaning |", "|---|---|---|---|", *rows])


def test_the_operations_guide_lists_every_setting_as_the_registry_has_it() -> None:
    found = re.search(
        r"<!-- settings table -->\n(.*?)\n<!-- end of settings table -->", OPERATIONS.read_text(),
        re.DOTALL,
    )  # fmt: skip
    assert found, "docs/operations.md has no settings table between its markers"
    assert found[1] == settings_table(), f"replace the table with:\n{settings_table()}"
