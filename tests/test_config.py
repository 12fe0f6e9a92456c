"""Settings: defaults, precedence (flags > env > file > defaults), bad values named."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from edgelink.config import KNOBS, ConfigError, Settings, load_settings, markdown_table

TOKEN = {"VX11_GATEWAY_TOKEN": "t"}


def module(settings, name):
    return next(m for m in settings.modules if m.name == name)


def test_defaults_match_the_contract():
    s = load_settings(env=TOKEN)
    assert (s.host, s.port, s.enable_auth) == ("0.0.0.0", 8000, True)
    assert s.db == "./data/edgelink.db" and s.ledger_sync == "full"
    assert (s.health_timeout, s.probe_interval, s.breaker_failures, s.breaker_recovery) == (2.0, 30.0, 3, 60.0)
    assert (s.max_body, s.max_header, s.max_connections) == (1_048_576, 16_384, 1000)
    assert (s.keepalive_timeout, s.header_timeout, s.shutdown_grace) == (5.0, 10.0, 10.0)
    assert s.cors_origins == () and s.access_log is False
    assert (s.context7_ttl_seconds, s.context7_cleanup_interval) == (3600.0, 300.0)
    urls = {m.name: (m.url, m.enabled) for m in s.modules}
    assert urls["madre"] == ("http://127.0.0.1:8001", True)
    assert urls["operator"] == ("http://127.0.0.1:8011", True)
    assert urls["shubniggurath"] == ("http://127.0.0.1:8007", False)
    chat = s.intent_target("chat")
    assert (chat.module, chat.endpoint, chat.timeout) == ("switch", "/switch/route-v5", 15.0)
    assert (chat.fallback.module, chat.fallback.endpoint, chat.fallback.timeout) == ("madre", "/madre/chat", 5.0)


def test_settings_fields_are_the_knobs_with_their_declared_types():
    hints = typing.get_type_hints(Settings)
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert set(fields) == {k.name for k in KNOBS} | {"modules", "intents", "config_file"}
    for knob in KNOBS:
        declared = typing.get_origin(hints[knob.name]) or hints[knob.name]
        assert fields[knob.name].default == knob.default, knob.name
        assert type(knob.default) is declared, f"{knob.name}: declared {declared}, default {knob.default!r}"


def test_first_token_name_wins():
    s = load_settings(env={"VX11_TENTACULO_LINK_TOKEN": "a", "VX11_GATEWAY_TOKEN": "b"})
    assert s.token == "a"
    assert load_settings(env={"VX11_GATEWAY_TOKEN": "b"}).token == "b"


def test_precedence_flags_env_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = 7000\nhealth_timeout = 1.5\nkeepalive_timeout = 9\n'
                   '[modules.madre]\nurl = "http://10.0.0.5:9001"\n'
                   '[routes.chat]\ntimeout = 3\n[routes.custom]\nmodule = "mcp"\nendpoint = "/mcp/run"\n')
    env = {**TOKEN, "TENTACULO_LINK_PORT": "7100", "EDGELINK_HEALTH_TIMEOUT": "0.5"}
    s = load_settings(env=env, config_file=str(cfg), overrides={"port": "7200"})
    assert s.port == 7200  # flag over env over file
    assert s.health_timeout == 0.5  # env over file
    assert s.keepalive_timeout == 9.0  # file over default
    assert module(s, "madre").url == "http://10.0.0.5:9001"
    assert s.intent_target("chat").timeout == 3.0 and s.intent_target("chat").fallback.module == "madre"
    assert s.intent_target("custom").module == "mcp" and s.intent_target("custom").method == "POST"
    env["MADRE_URL"] = "http://127.0.0.1:9999/"
    assert module(load_settings(env=env, config_file=str(cfg)), "madre").url == "http://127.0.0.1:9999"


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "Yes"])
def test_booleans_true(value):
    assert module(load_settings(env={**TOKEN, "SHUB_ENABLED": value}), "shubniggurath").enabled


@pytest.mark.parametrize("value", ["false", "0", "no", "NO"])
def test_booleans_false(value):
    assert load_settings(env={"ENABLE_AUTH": value}).enable_auth is False


@pytest.mark.parametrize("name,value", [
    ("ENABLE_AUTH", "maybe"), ("EDGELINK_MAX_BODY", "big"), ("EDGELINK_MAX_BODY", "0"),
    ("TENTACULO_LINK_PORT", "70000"), ("EDGELINK_LEDGER_SYNC", "sometimes"),
    ("EDGELINK_HEALTH_TIMEOUT", "-1"), ("MADRE_URL", "ftp://x"), ("SWITCH_URL", "not a url"),
    ("EDGELINK_LOG_LEVEL", "loud"),
])
def test_bad_values_name_the_setting(name, value):
    with pytest.raises(ConfigError) as info:
        load_settings(env={**TOKEN, name: value})
    assert name in str(info.value)


def test_auth_without_token_refused():
    with pytest.raises(ConfigError) as info:
        load_settings(env={})
    assert "VX11_GATEWAY_TOKEN" in str(info.value)


@pytest.mark.parametrize("text,needle", [
    ("port = 'x'", "port"), ("nonsense = 1", "nonsense"), ("[modules.nobody]\nurl='http://x'", "nobody"),
    ("[routes.chat]\nmodule = 'ghost'", "ghost"), ("[routes.new]\nmodule = 'mcp'", "endpoint"),
    ("this is not toml", "TOML"),
])
def test_bad_config_file(tmp_path, text, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(env=TOKEN, config_file=str(cfg))
    assert needle in str(info.value)


def test_missing_config_file_named():
    with pytest.raises(ConfigError) as info:
        load_settings(env=TOKEN, config_file="/nonexistent/edgelink.toml")
    assert "/nonexistent/edgelink.toml" in str(info.value)


def test_env_file_laid_over_environment(tmp_path):
    envfile = tmp_path / "edgelink.env"
    envfile.write_text('# comment\n\nVX11_GATEWAY_TOKEN="from-file"\nMADRE_URL=http://127.0.0.1:9101\n')
    s = load_settings(env={"VX11_GATEWAY_TOKEN": "from-env", "EDGELINK_ENV_FILE": str(envfile)})
    assert s.token == "from-file" and module(s, "madre").url == "http://127.0.0.1:9101"
    envfile.write_text("this line is wrong\n")
    with pytest.raises(ConfigError) as info:
        load_settings(env={"EDGELINK_ENV_FILE": str(envfile)})
    assert "line 1" in str(info.value)


def test_intents_carry_a_stream_flag(tmp_path):
    assert [r.intent for r in load_settings(env=TOKEN).intents if r.stream] == ["stream"]
    cfg = tmp_path / "c.toml"
    cfg.write_text('[routes.code]\nstream = true\n[routes.stream]\nstream = false\n'
                   '[routes.live]\nmodule = "mcp"\nendpoint = "/mcp/live"\nstream = true\n')
    s = load_settings(env=TOKEN, config_file=str(cfg))
    assert [s.intent_target(name).stream for name in ("code", "stream", "live")] == [True, False, True]
    cfg.write_text('[routes.code]\nstream = "sometimes"\n')
    with pytest.raises(ConfigError, match="routes.code.stream"):
        load_settings(env=TOKEN, config_file=str(cfg))


def test_every_problem_is_reported(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = "x"\n[modules.madre]\nurll = "http://127.0.0.1:1"\n[forward]\nwindo = 1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(env={"EDGELINK_MAX_BODY": "big"}, config_file=str(cfg))
    assert [p.split(" ")[0] for p in info.value.problems] == [
        "forward.windo:", "bad", "bad", "modules.madre.urll:", "auth"]
    assert "port in" in info.value.problems[1] and "EDGELINK_MAX_BODY" in info.value.problems[2]


def test_a_body_limit_over_the_budget_of_all_bodies_is_refused():
    assert load_settings(env={**TOKEN, "EDGELINK_MAX_BODY": "8388608"}).max_body == 8 * 1024 * 1024
    with pytest.raises(ConfigError, match=r"EDGELINK_MAX_BODY \(8388609\) is over EDGELINK_MAX_BODIES"):
        load_settings(env={**TOKEN, "EDGELINK_MAX_BODY": "8388609"})


def test_settings_doc_lists_every_setting_as_the_table_says():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "settings.md").read_text()
    block = doc.split("<!-- settings:begin -->\n")[1].split("\n<!-- settings:end -->")[0]
    assert block == markdown_table(), "regenerate with: python -c 'from edgelink.config import markdown_table as " \
                                      "t; print(t())'"
    assert len(block.splitlines()) == len(KNOBS) + 2
