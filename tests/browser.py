"""Headless Chromium for the page tests: Debian's browser, driven by Playwright.

A test module that imports this skips, naming what to install, where Chromium or the playwright
package is missing (CI installs both and forbids the skip).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="pip install playwright (in the test extra) to drive Chromium"
)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("install Debian's chromium (apt-get install chromium)", allow_module_level=True)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
WAIT_S = 15
