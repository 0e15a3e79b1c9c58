"""`peftlab ui` end to end: the real command serves the embedded model and three adapters (LoRA trained
by `peftlab train`, BLoB, and BiTA loaded from the page), and headless Chromium (Debian's, driven by
Playwright) uses every tab. Streamed answers must equal `peftlab generate` column by column; a bad run
path and an adapter of another base model must show readable errors. Screenshots go to
$PEFTLAB_ARTIFACTS (default test-artifacts/ui)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peftlab.cli import main

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "Mia has 3 apples and buys 4 more. How many apples does she have?"
MAX_NEW_TOKENS = 16
ARTIFACTS = Path(os.environ.get("PEFTLAB_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts")) / "ui"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}: `make test` installs Debian's chromium "
                    "(scripts/install_browser.sh needs root or sudo and apt)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed: pip install -e '.[test]'")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def runs(embedded, tmp_path_factory):
    """A LoRA run trained by `peftlab train`, a BLoB adapter with visible noise, a (random) BiTA adapter,
    and an adapter of another base model, all on disk."""
    from peftlab.adapters import BlobConfig, LoraConfig
    from peftlab.inject import add_adapter
    from peftlab.io import save_adapter
    from peftlab.methods.bita import BitaConfig, add_bita
    from peftlab.models import EMBEDDED_MODEL, load_model, tiny_model

    root = tmp_path_factory.mktemp("ui-runs")
    assert main(["train", "--data", "builtin:arithmetic:32", "--max-steps", "4", "--batch-size", "4",
                 "--lr", "3e-3", "--r", "4", "--output", str(root / "lora")]) == 0
    model = load_model(EMBEDDED_MODEL)
    add_adapter(model, BlobConfig(r=4, target_modules=["q_proj", "v_proj"], eps=0.3), seed=0)
    with torch.no_grad():  # B ≠ 0, so the sampled noise on A reaches the class probabilities
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    save_adapter(model, root / "blob")
    model = load_model(EMBEDDED_MODEL)
    add_bita(model, BitaConfig(), seed=0)
    save_adapter(model, root / "bita")
    other = tiny_model(seed=0)
    add_adapter(other, LoraConfig(r=2), seed=0)
    save_adapter(other, root / "tiny")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """`peftlab ui` as a user starts it, on a free loopback port; yields its URL."""
    log = tmp_path_factory.mktemp("ui-log") / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "peftlab.cli", "ui", "--adapter", str(runs / "lora"), "--adapter", str(runs / "blob"),
         "--port", str(_free_port())],
        stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        line, deadline = "", time.time() + 300
        while "serving http" not in line and time.time() < deadline and process.poll() is None:
            line = process.stdout.readline()
        if "serving http" not in line:
            pytest.fail(f"peftlab ui did not start: {log.read_text()[-2000:]}")
        yield line.split("serving ")[1].split()[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def page(browser, server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server)
    page.wait_for_selector("#chat-prompt textarea", timeout=60_000)
    yield page
    page.close()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _click_and_wait(page, button: str, status: str, *needles: str, timeout: float = 180_000) -> str:
    """Click ``button``, then wait until ``status`` shows a new message containing one of ``needles``
    (Gradio's progress overlay, "queue: 1/1 | 0.1s", "processing | 0.1s" or "0.1s", must be gone)."""
    before = page.inner_text(status)
    page.click(button)
    page.wait_for_function(
        "([sel, before, needles]) => { const e = document.querySelector(sel); if (!e) return false;"
        " const t = e.innerText; return t !== before && !/^\\s*(queue:|processing|[0-9.]+s)/.test(t)"
        " && needles.some(n => t.includes(n)); }", arg=[status, before, list(needles)], timeout=timeout)
    return page.inner_text(status)


def _generate(capsys, *args: str) -> str:
    """What `peftlab generate` prints for PROMPT with these arguments (greedy)."""
    capsys.readouterr()
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS), *args]) == 0
    return capsys.readouterr().out.rstrip("\n")


def test_runs_tab_shows_errors_then_a_run_and_loads_an_adapter(page, runs):
    page.get_by_role("tab", name="Runs").click()
    page.fill("#run-path textarea", str(runs / "no-such-run"))
    text = _click_and_wait(page, "#run-show", "#run-status", "Error")
    assert "not found" in text and "peftlab train" in text
    _shot(page, "runs-missing")
    page.fill("#run-path textarea", str(runs / "tiny"))
    text = _click_and_wait(page, "#run-load", "#run-status", "Error")
    assert "trained on base model 'tiny-llama-seed0'" in text
    _shot(page, "runs-wrong-base")
    page.fill("#run-path textarea", str(runs / "lora"))
    text = _click_and_wait(page, "#run-show", "#run-status", "trainable parameters", "Error")
    assert "method: lora" in text
    page.wait_for_selector("#run-loss img", timeout=30_000)  # the loss curve is drawn
    _shot(page, "runs")
    page.fill("#run-path textarea", str(runs / "bita"))
    assert "Loaded" in _click_and_wait(page, "#run-load", "#run-status", "Loaded", "Error")
    page.get_by_role("tab", name="Chat").click()
    page.wait_for_selector("#answer-3 textarea", state="visible", timeout=10_000)  # a fourth column for it
    assert "3 adapter(s) loaded" in page.inner_text("body")


def test_chat_streams_every_column_and_equals_generate(page, runs, capsys):
    expected = [_generate(capsys), _generate(capsys, "--adapter", str(runs / "lora")),
                _generate(capsys, "--adapter", str(runs / "blob")), _generate(capsys, "--adapter", str(runs / "bita"))]
    page.get_by_role("tab", name="Chat").click()
    page.fill("#chat-prompt textarea", PROMPT)
    page.fill("#chat-max-tokens input[type=number]", str(MAX_NEW_TOKENS))
    page.press("#chat-max-tokens input[type=number]", "Tab")
    page.click("#chat-send")
    seen = set()  # the first column's successive values: more than one means it streamed
    deadline = time.time() + 300
    while "Done" not in page.inner_text("#chat-status") and time.time() < deadline:
        seen.add(page.input_value("#answer-0 textarea"))
        time.sleep(0.05)
    _shot(page, "chat")
    assert "Done: 4 model(s)" in page.inner_text("#chat-status")
    answers = [page.input_value(f"#answer-{i} textarea") for i in range(4)]
    assert answers == expected
    assert expected[1] != expected[0]  # the trained LoRA column is another model's answer
    assert len(seen - {""}) >= 2, seen
    for i in range(4):
        assert "tokens/s" in page.inner_text(f"#stats-{i}")


def test_uncertainty_tab_shows_spread_over_samples(page):
    page.get_by_role("tab", name="Uncertainty").click()
    text = _click_and_wait(page, "#choice-score", "#choice-status", "picks", "Error")
    assert "picks" in text and "largest std over passes" in text
    page.wait_for_selector("#choice-plot img", timeout=30_000)
    table = page.inner_text("#choice-table")
    assert all(option in table for option in ("A) the sun", "B) a rock", "C) a shadow", "D) a spoon")), table
    _shot(page, "uncertainty")


def test_acceleration_tab_is_lossless_and_highlights_drafts(page):
    page.get_by_role("tab", name="Acceleration").click()
    page.fill("#bita-prompt textarea", PROMPT)
    text = _click_and_wait(page, "#bita-run", "#bita-status", "speed-up", "Error")
    assert "identical to plain greedy" in text and "tokens per pass" in text
    plain, fast = page.input_value("#bita-plain textarea"), page.input_value("#bita-fast textarea")
    assert plain and plain == fast
    assert page.inner_text("#bita-drafted").strip()  # the token-by-token view is drawn
    _shot(page, "acceleration")
