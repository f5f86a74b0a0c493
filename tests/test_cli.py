"""`python -m bot ...` as an operator runs it: real subprocesses, real ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from bot.sim.realtime import bundled_scenarios

REPO = Path(__file__).resolve().parent.parent
CALLER_WAV = str(REPO / "bot" / "sim" / "audio" / "caller_washers.wav")
# Runs `python -m bot ARGS` with some modules made unimportable, as if an extra were not installed.
WITHOUT_MODULES = (
    "import runpy, sys; sys.modules.update(dict.fromkeys({modules!r})); "
    "runpy.run_module('bot', run_name='__main__', alter_sys=True)"
)


def run_bot(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_without_a_command_the_usage_lists_every_command() -> None:
    result = run_bot()
    assert result.returncode == 0
    for command in ("serve", "demo", "call", "sim", "catalog", "outbox"):
        assert f"  {command} " in result.stdout


def test_an_unknown_command_exits_2_naming_the_commands() -> None:
    result = run_bot("launch")
    assert result.returncode == 2
    assert "unknown command 'launch'; the commands are serve, demo, call" in result.stderr


def test_serve_refuses_to_start_on_a_bad_setting_and_names_it() -> None:
    result = run_bot("serve", env={"PORT": "eighty", "AUDIO_FORMAT": "wav"})
    assert result.returncode == 2
    assert "PORT" in result.stderr and "AUDIO_FORMAT" in result.stderr


def test_serve_answers_health_checks_on_the_port_it_is_given(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_PATH": str(tmp_path / "outbox.sqlite3"),
        "OPENAI_API_KEY": "",
        "OPENAI": "",
        "LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()
                break
            except httpx.TransportError:
                assert server.poll() is None, server.communicate()[1]
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        assert health["status"] == "ok"
        assert health["features"]["realtime"] is False
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=20)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended.
    assert server.returncode in (0, -signal.SIGTERM), stderr
    assert "Traceback" not in stderr
    assert "OPENAI_API_KEY is not set" in stderr


def test_serve_refuses_an_unreadable_catalog_naming_the_file_and_the_error(tmp_path: Path) -> None:
    broken = tmp_path / "catalog.json"
    broken.write_text('[{"sku": "WM-1"')
    result = run_bot("serve", env={"CATALOG_PATH": str(broken)})
    assert result.returncode == 2
    assert str(broken) in result.stderr and "not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


# --- every mistake a user can make on the command line: one line, no traceback ---------------

BUSY_PORT = "{busy_port}"
Run = Future[subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class Mistake:
    args: tuple[str, ...]
    exit_code: int
    says: str
    env: dict[str, str] = field(default_factory=dict)
    without_modules: tuple[str, ...] = ()


MISTAKES = {
    "an unknown command": Mistake(("launch",), 2, "unknown command 'launch'"),
    "sim without a simulator": Mistake(("sim",), 2, "name a simulator: realtime or twilio-api"),
    "an unknown simulator": Mistake(("sim", "nosuch"), 2, "unknown simulator 'nosuch'"),
    "an unknown scenario": Mistake(
        ("sim", "realtime", "--scenario", "nosuch"), 2, "no scenario 'nosuch': give a scenario JSON file "
        f"or a bundled name ({', '.join(bundled_scenarios())})"
    ),
    "a port that is not a number": Mistake(("sim", "twilio-api", "--port", "eighty"), 2, "not a port number"),
    "a Realtime simulator port in use": Mistake(
        ("sim", "realtime", "--port", BUSY_PORT), 1, "cannot listen: error while attempting to bind"
    ),
    "a Twilio simulator port in use": Mistake(
        ("sim", "twilio-api", "--port", BUSY_PORT), 1, "cannot listen: Address already in use"
    ),
    "the demo without the [sim] extra": Mistake(
        ("demo",), 2, "needs the optional [sim] dependencies (no module 'openai'): pip install -e '.[sim]'",
        without_modules=("openai",),
    ),
    "the Realtime simulator without the [sim] extra": Mistake(
        ("sim", "realtime"), 2, "python -m bot sim needs the optional [sim] dependencies",
        without_modules=("openai",),
    ),
    "the demo writing into a missing folder": Mistake(
        ("demo", "--heard", "/nonexistent/heard.wav"), 2, "the folder /nonexistent does not exist"
    ),
    "call without its arguments": Mistake(("call",), 2, "the following arguments are required: url, --audio"),
    "call without a Twilio auth token": Mistake(
        ("call", "http://127.0.0.1:9", "--audio", CALLER_WAV), 2,
        "TWILIO_AUTH_TOKEN is not set, and the bot refuses unsigned calls (403)",
    ),
    "call with a missing WAV": Mistake(
        ("call", "http://127.0.0.1:9", "--audio", "nosuch.wav"), 2, "No such file or directory: 'nosuch.wav'",
        env={"TWILIO_AUTH_TOKEN": "token"},
    ),
    "call with zero calls": Mistake(
        ("call", "http://127.0.0.1:9", "--audio", CALLER_WAV, "--calls", "0"), 2,
        "--calls: must be a whole number",
        env={"TWILIO_AUTH_TOKEN": "token"},
    ),
    "catalog without a command": Mistake(("catalog",), 2, "arguments are required: {check,import,search}"),
    "catalog check of a missing file": Mistake(
        ("catalog", "check", "nosuch.json"), 1, "nosuch.json: cannot read"
    ),
    "catalog search with a price in words": Mistake(
        ("catalog", "search", "washer", "--max-price", "cheap"), 2, "invalid float value: 'cheap'"
    ),
    "serve on a port that cannot exist": Mistake(("serve", "--port", "99999"), 2, "not a port number"),
    "serve with no workers": Mistake(("serve", "--workers", "0"), 2, "--workers: must be a whole number"),
    "outbox retry without a message id": Mistake(("outbox", "retry"), 2, "arguments are required: ID"),
    "serve with a webhook secret stock verifiers would misread": Mistake(
        ("serve",), 2, "WEBHOOK_SECRET: not a Standard Webhooks secret", env={"WEBHOOK_SECRET": "mysecret123"}
    ),
}


def run_in(
    cwd: Path, args: tuple[str, ...], env: dict[str, str], without: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`python -m bot ARGS` in `cwd` (no stray .env) with only `env` set besides PATH."""
    command = [sys.executable, "-m", "bot"]
    if without:
        command = [sys.executable, "-c", WITHOUT_MODULES.format(modules=list(without))]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", ""), **env},
    )


@pytest.fixture(scope="module")
def mistake_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Every mistake run at once, a few at a time (each is a fresh interpreter)."""
    cwd = tmp_path_factory.mktemp("cli")
    with socket.socket() as busy, ThreadPoolExecutor(max_workers=3) as pool:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        runs = {
            name: pool.submit(
                run_in, cwd, tuple(a.replace(BUSY_PORT, port) for a in m.args), m.env, m.without_modules
            )
            for name, m in MISTAKES.items()
        }
        yield runs
        for run in runs.values():
            run.result()


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_command_line_mistake_gets_one_clear_line_and_no_traceback(
    name: str, mistake_runs: dict[str, Run]
) -> None:
    mistake = MISTAKES[name]
    result = mistake_runs[name].result()
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert mistake.says in line
    assert result.returncode == mistake.exit_code


# --- --help ------------------------------------------------------------------------------------

HELP_COMMANDS = [
    (),
    ("serve",),
    ("demo",),
    ("call",),
    ("sim",),
    ("sim", "realtime"),
    ("sim", "twilio-api"),
    ("catalog",),
    ("catalog", "check"),
    ("catalog", "import"),
    ("catalog", "search"),
    ("outbox",),
    ("outbox", "retry"),
    ("outbox", "enable-webhooks"),
    ("outbox", "relay"),
]
def options_without_help(text: str) -> list[str]:
    """Entries of argparse's option and command lists with no explanation beside or below them."""
    lines = text.splitlines()
    missing, in_list = [], False
    for number, line in enumerate(lines):
        if line and not line.startswith(" "):
            in_list = line.endswith(":") and not line.startswith("usage:")
            continue
        if not in_list or not re.match(r"  \S", line) or re.search(r"\S {2,}\S", line[2:]):
            continue
        following = lines[number + 1] if number + 1 < len(lines) else ""
        if not re.match(r" {4,}\S", following):
            missing.append(line.strip())
    return missing


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "bot")
def test_every_help_exits_0_and_explains_each_option(command: tuple[str, ...], tmp_path: Path) -> None:
    result = run_in(tmp_path, (*command, "--help"), {})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("usage: python -m bot")
    assert options_without_help(result.stdout) == []


def test_help_piped_into_a_reader_that_stops_early_ends_quietly() -> None:
    reader_gone = subprocess.Popen(
        [sys.executable, "-m", "bot", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert reader_gone.stdout is not None and reader_gone.stderr is not None
    reader_gone.stdout.close()  # like `| head -0`: the pipe is gone before the help is written
    stderr = reader_gone.stderr.read().decode()
    reader_gone.wait(timeout=30)
    assert stderr == ""


# --- the simulators take the credentials the bot reads ---------------------------------------


class Running:
    """A long-running `python -m bot ...` whose printed `NAME=value` lines are collected."""

    def __init__(self, args: tuple[str, ...], env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={"PATH": os.environ.get("PATH", ""), **env},
        )
        self.lines: list[str] = []

    def read_until(self, prefix: str) -> dict[str, str]:
        """Lines up to the first starting with `prefix` (stripped), as NAME=value pairs."""
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.strip()
            self.lines.append(line)
            if line.startswith(prefix):
                break
        else:
            raise AssertionError(f"exited before printing {prefix}: {self.stop()}")
        return dict(line.split("=", 1) for line in self.lines if "=" in line and " " not in line)

    def stop(self) -> str:
        """Stops it (SIGTERM, as a service manager does) and returns what it wrote on stderr."""
        self.process.terminate()
        _, stderr = self.process.communicate(timeout=20)
        return stderr


def messages_url(api_base: str, account_sid: str) -> str:
    return f"{api_base}/2010-04-01/Accounts/{account_sid}/Messages.json"


def test_the_twilio_simulator_accepts_the_account_the_bot_is_configured_with(tmp_path: Path) -> None:
    account = {"TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": "the-bots-token"}
    sim = Running(("sim", "twilio-api"), account, tmp_path)
    try:
        printed = sim.read_until("TWILIO_FROM_NUMBER=")
        url = messages_url(printed["TWILIO_API_BASE"], account["TWILIO_ACCOUNT_SID"])
        sms = {"To": "+15551230001", "From": printed["TWILIO_FROM_NUMBER"], "Body": "hello"}
        accepted = httpx.post(url, data=sms, auth=(account["TWILIO_ACCOUNT_SID"], "the-bots-token"))
        refused = httpx.post(url, data=sms, auth=(account["TWILIO_ACCOUNT_SID"], "another-token"))
    finally:
        stderr = sim.stop()
    assert printed["TWILIO_ACCOUNT_SID"] == account["TWILIO_ACCOUNT_SID"]
    assert "TWILIO_AUTH_TOKEN: the one already set" in sim.lines[3]
    assert "the-bots-token" not in "\n".join(sim.lines)
    assert (accepted.status_code, refused.status_code) == (201, 401)
    assert "Twilio error 20003" in stderr and "TWILIO_AUTH_TOKEN" in stderr


def test_the_twilio_simulator_without_settings_prints_the_account_to_set(tmp_path: Path) -> None:
    sim = Running(("sim", "twilio-api"), {}, tmp_path)
    try:
        printed = sim.read_until("TWILIO_FROM_NUMBER=")
        account = (printed["TWILIO_ACCOUNT_SID"], printed["TWILIO_AUTH_TOKEN"])
        url = messages_url(printed["TWILIO_API_BASE"], account[0])
        sms = {"To": "+15551230001", "From": printed["TWILIO_FROM_NUMBER"], "Body": "hello"}
        accepted = httpx.post(url, data=sms, auth=account)
    finally:
        sim.stop()
    assert accepted.status_code == 201


@pytest.mark.parametrize(
    ("env", "printed_key_line"),
    [
        ({}, "OPENAI_API_KEY=sk-sim-test"),
        ({"OPENAI_API_KEY": "sk-the-bots-key"}, "OPENAI_API_KEY: the one already set"),
    ],
)
def test_the_realtime_simulator_prints_the_key_it_accepts(
    tmp_path: Path, env: dict[str, str], printed_key_line: str
) -> None:
    sim = Running(("sim", "realtime"), env, tmp_path)
    try:
        printed = sim.read_until("OPENAI_API_KEY")
        key = env.get("OPENAI_API_KEY", "sk-sim-test")
        secret = httpx.post(
            printed["OPENAI_BASE_URL"] + "/v1/realtime/client_secrets",
            json={"session": {"type": "realtime", "model": "gpt-realtime"}},
            headers={"Authorization": f"Bearer {key}"},
        )
    finally:
        sim.stop()
    assert sim.lines[-1].startswith(printed_key_line)
    assert secret.status_code == 200
    assert "sk-the-bots-key" not in "\n".join(sim.lines)
