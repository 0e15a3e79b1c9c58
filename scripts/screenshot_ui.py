"""Screenshots of `peftlab ui` for the README: starts the page over the given runs, uses each tab in
headless Chromium (Debian's, via Playwright) and writes docs/images/ui-*.png.

    python scripts/screenshot_ui.py --adapter runs/demo --adapter runs/bita/gsm8k \
        --adapter runs/blob_study/arc_e/blob/seed1 --run runs/demo
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHAT_PROMPT = "Tom has 12 marbles and gives 5 to his sister. How many marbles does he have left?"
BITA_PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
               "How many clips did Natalia sell altogether in April and May?")


def wait_for(page, selector: str, needle: str, timeout: float = 300_000) -> None:
    page.wait_for_function("([s, n]) => { const e = document.querySelector(s); return e && e.innerText.includes(n); }",
                           arg=[selector, needle], timeout=timeout)


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", action="append", default=[], help="run directory to load (repeatable)")
    parser.add_argument("--run", default="runs/demo", help="run directory shown in the Runs tab")
    parser.add_argument("--port", type=int, default=7869)
    parser.add_argument("--output", default="docs/images", help="folder for the PNGs")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "peftlab.cli", "ui", "--port", str(args.port)]
    for adapter in args.adapter:
        command += ["--adapter", adapter]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving http" not in line:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                sys.exit("peftlab ui did not start")
        url = line.split("serving ")[1].split()[0]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.fill("#chat-prompt textarea", CHAT_PROMPT)
            page.fill("#chat-max-tokens input[type=number]", "48")
            page.press("#chat-max-tokens input[type=number]", "Tab")
            page.click("#chat-send")
            wait_for(page, "#chat-status", "Done")
            page.screenshot(path=str(out / "ui-chat.png"), full_page=True)
            page.get_by_role("tab", name="Runs").click()
            page.fill("#run-path textarea", args.run)
            page.click("#run-show")
            wait_for(page, "#run-status", "trainable parameters")
            time.sleep(1)
            page.screenshot(path=str(out / "ui-runs.png"), full_page=True)
            page.get_by_role("tab", name="Uncertainty").click()
            page.click("#choice-score")
            wait_for(page, "#choice-status", "picks")
            time.sleep(1)
            page.screenshot(path=str(out / "ui-uncertainty.png"), full_page=True)
            page.get_by_role("tab", name="Acceleration").click()
            page.fill("#bita-prompt textarea", BITA_PROMPT)
            page.click("#bita-run")
            wait_for(page, "#bita-status", "speed-up")
            time.sleep(1)
            page.screenshot(path=str(out / "ui-acceleration.png"), full_page=True)
            browser.close()
        print(f"screenshots in {out}/ui-*.png")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
