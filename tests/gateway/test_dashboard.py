"""The dashboard: its data endpoint, and the page itself rendered by headless Chromium."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import httpx
import pytest

from tests.gateway.live_server import API_KEY, MODEL_NAME, LiveServer, gateway_config
from tokenfactory.control.tiers import parse_factory_config

WIDTH, HEIGHT = 1280, 900
FACTORY = """
tiers:
  flex: {priority: -10, sheddable: true, prices: {default: {input: 0.05, output: 0.2}}}
  default: {priority: 0, prices: {default: {input: 0.1, output: 0.4}}}
  priority: {priority: 10, prices: {default: {input: 0.2, output: 0.8}}}
power:
  static_cap_w: 28
  grid_events:
    - {name: evening peak, start: '17:00', duration_s: 3600, cut_fraction: 0.25}
"""


@pytest.fixture(scope="module")
def dashboard(tiny_model_dir):
    server = LiveServer(gateway_config(tiny_model_dir), api_keys=[API_KEY], admin_key="sk-admin",
                        tiers=parse_factory_config(FACTORY)).start()
    for tier in ("flex", "default", "priority"):
        resp = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": MODEL_NAME, "prompt": "a dashboard for the factory", "max_tokens": 8,
                                "ignore_eos": True, "service_tier": tier}, timeout=60)
        assert resp.status_code == 200, resp.text
    cut = httpx.post(f"{server.url}/admin/grid-events", headers={"Authorization": "Bearer sk-admin"}, timeout=10,
                     json={"name": "demand response", "cut_fraction": 0.25, "duration_s": 3600})
    assert cut.status_code == 200
    yield server
    server.stop()


def test_the_data_has_every_tier_the_power_budget_and_the_grid_events(dashboard):
    data = httpx.get(f"{dashboard.url}/dashboard/data", timeout=10).json()
    assert [t["name"] for t in data["tiers"]] == ["priority", "default", "flex"]  # highest first
    assert data["totals"]["requests"] == 3
    assert data["totals"]["ttft_p50_s"] > 0 and data["totals"]["joules_per_token"] > 0
    assert data["totals"]["usd_per_mtok"] > 0
    for tier in data["tiers"]:
        assert tier["admitted"] and tier["ttft_p50_s"] > 0 and tier["usd_per_mtok"] > 0
    assert data["power"]["source"] == "modeled" and data["power"]["static_cap_w"] == 28
    assert data["power"]["budget_w"] == pytest.approx(21.0)  # the admin's 25% cut, in force at once
    assert {(e["name"], e["source"]) for e in data["events"]} >= {("demand response", "admin"),
                                                                  ("evening peak", "config")}
    assert len(data["history"]["t"]) >= 1 and data["history"]["budget_w"][-1] == pytest.approx(21.0)


def test_the_page_and_its_assets_are_served(dashboard):
    page = httpx.get(f"{dashboard.url}/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/dashboard/dashboard.js" in page.text and "http" not in page.text  # nothing from a CDN
    script = httpx.get(f"{dashboard.url}/dashboard/dashboard.js", timeout=10)
    assert script.status_code == 200 and "/dashboard/data" in script.text
    assert httpx.get(f"{dashboard.url}/dashboard/dashboard.css", timeout=10).status_code == 200


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium is not installed (Debian: apt-get install chromium)")


def run_chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=5000", *args, url],
        capture_output=True, text=True, timeout=180)


def png_pixels(data: bytes) -> tuple[int, int, set[bytes]]:
    """Width, height and the distinct RGB(A) pixels of an 8-bit RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color_type, _, _, interlace = header
    assert depth == 8 and color_type in (2, 6) and interlace == 0
    bpp = 3 if color_type == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, colours = bytearray(stride), set()
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):  # undo the row's filter (PNG spec, section 9)
            left = line[i - bpp] if i >= bpp else 0
            up, up_left = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
        if row % 4 == 0:  # a sample of rows is plenty to tell a page from a blank
            colours.update(bytes(line[i:i + bpp]) for i in range(0, stride, bpp * 2))
        prev = line
    return width, height, colours


def test_chromium_renders_the_live_page(dashboard, tmp_path):
    chromium()
    dom = run_chromium(f"{dashboard.url}/dashboard", tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert re.search(r'id="status" class="pill live">live<', html), "the page never got its data"
    assert re.search(r'id="kpi-power">[\d.]+ / 21 W<', html)  # power against the cut budget
    assert re.search(r'id="kpi-ttft">\d+(\.\d+)? m?s<', html)
    assert re.search(r'id="kpi-jpt">\d+\.\d+<', html) and re.search(r'id="kpi-usd">\$\d+\.\d+<', html)
    assert "demand response" in html and "evening peak" in html
    assert html.count('class="tag ok">admitted<') == 3
    assert html.count("<path") >= 2  # the charts were drawn

    shot = tmp_path / "dashboard.png"
    result = run_chromium(f"{dashboard.url}/dashboard", tmp_path / "profile-shot", f"--screenshot={shot}")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    width, height, colours = png_pixels(shot.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    assert len(colours) > 50, f"only {len(colours)} colours: the page looks blank"
