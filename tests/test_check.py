"""`edgelink check` (API.md §7) and the systemd unit lines that run it before start and reload."""

from __future__ import annotations

import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import EDGELINK, TOKEN, clean_env, log_records, wait_for_log
from edgelink.compat import tomllib
from edgelink.config import KNOBS, load_settings

SERVICE = Path(__file__).resolve().parent.parent / "systemd" / "edgelink.service"


def check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = clean_env(VX11_GATEWAY_TOKEN=TOKEN, EDGELINK_DB=str(tmp_path / "never.db"))
    full_env.update(env)
    return subprocess.run([EDGELINK, "check", *args], capture_output=True, text=True, env=full_env,
                          cwd=tmp_path, timeout=60)


def test_ok_without_touching_the_ledger(tmp_path):
    config = tmp_path / "ok.toml"
    config.write_text('proxy_timeout = 3\n[modules.madre]\nurl = "http://127.0.0.1:9001"\n')
    result = check(tmp_path, "--config", str(config))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")
    assert not (tmp_path / "never.db").exists()


def test_every_problem_is_reported_once_a_line_naming_its_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('port = "x"\nnonsense = 1\n'
                      '[modules]\nmadre = "http://10.0.0.1:1"\n'
                      '[modules.switch]\nurll = "http://10.0.0.1:2"\n'
                      '[routes.chat]\nmodule = "ghost"\nspeed = 1\n'
                      '[forward]\nurl = "http://h"\nwindo = 2\n')
    result = check(tmp_path, "--config", str(config), EDGELINK_MAX_BODY="big", ENABLE_AUTH="maybe")
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    for needle in ("port", "nonsense", "modules.madre", "modules.switch.urll", "routes.chat.speed", "ghost",
                   "forward.windo", "EDGELINK_MAX_BODY", "ENABLE_AUTH"):
        assert sum(needle in line for line in lines) >= 1, (needle, lines)
    assert len(lines) == 9, lines
    assert "invalid literal" not in result.stderr and "Traceback" not in result.stderr


def test_under_journald_each_problem_is_an_error_line(tmp_path):
    """systemd files stderr at priority info unless a line says otherwise: the refusal of a
    start or reload must show in `journalctl -p warning` (tests/test_systemd_boot.py)."""
    config = tmp_path / "bad.toml"
    config.write_text('port = "x"\nnonsense = 1\n')
    result = check(tmp_path, "--config", str(config), JOURNAL_STREAM="8:12345")
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 2
    assert all(line.startswith("<3>edgelink check: ") for line in lines), lines
    serve = subprocess.run([EDGELINK, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60,
                           env=clean_env(VX11_GATEWAY_TOKEN=TOKEN, JOURNAL_STREAM="8:12345"), cwd=tmp_path)
    assert serve.returncode == 1 and serve.stderr.startswith("<3>edgelink: "), serve.stderr


@pytest.mark.parametrize("text,key", [
    ("[modules.madre]\nurll = 'http://127.0.0.1:1'", "modules.madre.urll"),
    ("[modules]\nmadre = 'http://127.0.0.1:1'", "modules.madre"),
    ("[routes.chat]\ntimeuot = 3", "routes.chat.timeuot"),
    ("[routes.chat.fallback]\nmodule = 'madre'\nendpoint = '/x'\nretries = 1", "routes.chat.fallback.retries"),
    ("[forward]\nurls = 'http://h'", "forward.urls"),
    ("forward_url = 'http://h'", "forward_url"),
    ("helth_timeout = 1", "helth_timeout"),
])
def test_unknown_keys_anywhere_are_errors(tmp_path, text, key):
    config = tmp_path / "c.toml"
    config.write_text(text)
    result = check(tmp_path, "--config", str(config))
    assert result.returncode == 1
    assert any(line.split(": ", 1)[1].startswith(key) for line in result.stderr.splitlines()), result.stderr


@pytest.mark.parametrize("name,value,reason", [
    ("EDGELINK_MAX_BODY", "1.5", "expected an integer"),
    ("EDGELINK_HEALTH_TIMEOUT", "soon", "expected a number"),
    ("EDGELINK_HEALTH_TIMEOUT", "nan", "must be >= 0.01"),
    ("TENTACULO_LINK_PORT", "http", "expected an integer"),
])
def test_messages_are_for_people(tmp_path, name, value, reason):
    result = check(tmp_path, **{name: value})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"edgelink check: bad value for {name}: {value!r} ({reason})"]


def test_print_redacts_secrets_and_reads_back_the_same(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('edge_id = "pi-7"\n[forward]\nurl = "nats://edge:url-secret@h:4222"\ntoken = "fw-secret"\n'
                      'password = "pw"\n'
                      '[routes.chat]\nfallback = false\n[routes.summarize]\nmodule = "madre"\nendpoint = "/t"\n')
    result = check(tmp_path, "--config", str(config), "--print", EDGELINK_MAX_BODY="2048")
    assert result.returncode == 0, result.stderr
    for secret in (TOKEN, "fw-secret", '"pw"', "url-secret"):
        assert secret not in result.stdout
    printed = tomllib.loads(result.stdout)
    assert printed["max_body"] == 2048 and printed["forward"]["url"] == "nats://edge:<redacted>@h:4222"
    assert printed["token"] == printed["forward"]["token"] == "<redacted>"
    (tmp_path / "printed.toml").write_text(result.stdout)
    env = {"VX11_GATEWAY_TOKEN": TOKEN, "EDGELINK_DB": str(tmp_path / "never.db")}
    original = load_settings(env={**env, "EDGELINK_MAX_BODY": "2048"}, config_file=str(config))
    again = load_settings(env=env, config_file=str(tmp_path / "printed.toml"))
    for knob in KNOBS:
        if not knob.secret and knob.name != "forward_url":
            assert getattr(again, knob.name) == getattr(original, knob.name), knob.name
    assert (again.modules, again.intents) == (original.modules, original.intents)


# -- the systemd unit's own command lines ------------------------------------------------


def unit_commands(key: str) -> list[str]:
    section = ""
    found = []
    for line in SERVICE.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and line.startswith(f"{key}="):
            found.append(line.partition("=")[2])
    return found


def run_unit_line(line: str, tmp_path: Path, config: Path, main_pid: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """One Exec line as systemd would run it, with the installed binary and config path
    pointed at this test's (no ``-`` prefix: a failure must fail the job)."""
    assert line[0] not in "-@:+!", line
    start = shlex.split(unit_commands("ExecStart")[0])
    binary, config_path = start[0], start[start.index("--config") + 1]
    argv = [{binary: EDGELINK, config_path: str(config), "$MAINPID": str(main_pid)}.get(word, word)
            for word in shlex.split(line)]
    # systemd also puts $MAINPID in the environment of ExecReload= (the unit's sh -c reads it there)
    return subprocess.run(argv, capture_output=True, text=True, env={**env, "MAINPID": str(main_pid)}, cwd=tmp_path,
                          timeout=60)


def test_unit_checks_before_start_and_before_reload(tmp_path, gateway_factory):
    config = tmp_path / "edgelink.toml"
    config.write_text("max_body = 100000\n")
    pre, reload_lines = unit_commands("ExecStartPre"), unit_commands("ExecReload")
    assert any(" check " in line for line in pre)
    assert " check " in reload_lines[0] and "HUP" in reload_lines[-1]

    gw = gateway_factory(args=["--config", str(config)])
    env = {**gw.env, "EDGELINK_DB": str(tmp_path / "never.db")}
    for line in pre:
        result = run_unit_line(line, tmp_path, config, gw.proc.pid, env)
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr

    # a broken file: the reload job fails at the check, the HUP is never sent
    config.write_text("max_body = 10\n[modules.madre]\nurll = 'http://127.0.0.1:1'\n")
    before = len(log_records(gw.log_path))
    for line in reload_lines:
        result = run_unit_line(line, tmp_path, config, gw.proc.pid, env)
        if result.returncode != 0:
            break
    assert result.returncode == 1 and "modules.madre.urll" in result.stderr
    assert line == reload_lines[0]
    assert gw.post("/events/ingest", {"source": "t", "type": "x", "payload": {"pad": "a" * 200}}).status == 201

    # a good file: check, then the HUP, and the new limit applies
    config.write_text("max_body = 10\n")
    for line in reload_lines:
        assert run_unit_line(line, tmp_path, config, gw.proc.pid, env).returncode == 0
    wait_for_log(gw.log_path, "reloaded", gw.proc, after=before)
    assert gw.post("/events/ingest", {"source": "t", "type": "x", "payload": {"pad": "a" * 200}}).status == 413
    assert gw.stop(signal.SIGTERM) == 0
    assert not (tmp_path / "never.db").exists()
