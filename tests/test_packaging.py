"""The container image's steps, without a container engine: the files the Dockerfile copies,
a non-editable install into a clean virtualenv, and the bot started from another folder.

The install is offline: the dependencies and the build backend come from this interpreter's
environment through a .pth file (it adds paths only, so a checkout's editable install is not
loaded), and only the bot itself is installed into the virtualenv.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from bot.sim.phone import SIGNATURE_HEADER, compute_signature, inbound_call_params
from bot.sim.postgres import free_port

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "packaging-test-token"
START_TIMEOUT_S = 30.0
DEMO_TIMEOUT_S = 40.0


def dockerfile_sources() -> list[str]:
    """What the Dockerfile copies into its build folder (`COPY a b ./`, `COPY bot ./bot`)."""
    sources: list[str] = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    return sources


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a clean virtualenv with the bot installed from a copy of the sources."""
    folder = tmp_path_factory.mktemp("image")
    src = folder / "src"
    src.mkdir()
    for name in dockerfile_sources():
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    outer = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (Path(purelib) / "outer-environment.pth").write_text("\n".join(outer) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", str(src)],
        check=True,
        cwd=folder,
    )  # fmt: skip
    return python


def clean_env(**env: str) -> dict[str, str]:
    """The environment without anything pointing at the checkout."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "LOG_LEVEL": "WARNING", **env}


def test_every_package_under_bot_is_listed_for_setuptools() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "bot").rglob("__init__.py")}
    assert listed == found | {"bot.twiml_documents"}


def test_the_image_runs_as_a_non_root_user_and_checks_its_health() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "\nUSER voicebot\n" in dockerfile and 'pip install ".[postgres]"' in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert dockerfile_sources() == ["pyproject.toml", "README.md", "bot", "twiml"]


def test_the_installed_bot_runs_from_site_packages(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run(
        [installed, "-c", "import bot.twiml; print(bot.__file__); print(bot.twiml.TWIML_DIR)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
    ).stdout.split()
    venv = installed.parent.parent
    assert all(Path(path).is_relative_to(venv) for path in where), where


async def test_the_installed_bot_serves_its_twiml_from_another_folder(
    installed: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = clean_env(
        DATABASE_PATH=str(tmp_path / "outbox.sqlite3"),
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        OPENAI_API_KEY="",
        OPENAI="",
    )
    server = await asyncio.create_subprocess_exec(
        installed, "-m", "bot", "serve", "--host", "127.0.0.1", "--port", str(port),
        cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    health = (await client.get(url + "/healthz")).json()
                    break
                except httpx.TransportError:
                    assert server.returncode is None and time.monotonic() < deadline, "serve did not start"
                    await asyncio.sleep(0.1)
            params = inbound_call_params(
                call_sid="CA" + "2" * 32,
                account_sid=ACCOUNT_SID,
                caller="+15551230001",
                called="+15557650002",
            )
            signature = compute_signature(AUTH_TOKEN, url + "/twiml/voice", params)
            twiml = await client.post(
                url + "/twiml/voice", data=params, headers={SIGNATURE_HEADER: signature}
            )
    finally:
        server.terminate()
        _, stderr = await server.communicate()
    assert health["status"] == "ok", stderr.decode()
    assert twiml.status_code == 200 and "<Say" in twiml.text  # the fallback document (no OpenAI key)


async def test_the_installed_demo_places_its_call_from_another_folder(
    installed: Path, tmp_path: Path
) -> None:
    """Until the caller speaks its first recording: the TwiML, audio and scenario all shipped."""
    demo = await asyncio.create_subprocess_exec(
        installed, "-m", "bot", "demo", "--heard", str(tmp_path / "heard.wav"),
        cwd=tmp_path, env=clean_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert demo.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(DEMO_TIMEOUT_S):
            while not any("caller speaks (caller_washers.wav)" in line for line in lines):
                line = (await demo.stdout.readline()).decode()
                assert line, "the demo ended early:\n" + "".join(lines)
                lines.append(line)
    finally:
        demo.terminate()
        await demo.wait()
    assert any(" bot " in line and "Hi" in line for line in lines), "".join(lines)
