"""The Gradio UI (deploy/gradio_app.py) in headless Chromium, driven by Playwright, against a running
local image service (sd_py's pipeline and request validation behind uvicorn, without Ray, to keep
the test fast; the Ray tests cover the Serve app itself)."""

import importlib.util
import io
import os
import shutil
import threading
import time
from typing import Optional

import pytest

from conftest import DEPLOY, SD2, free_port

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _serve_in_thread(app, port):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test service did not start")
        time.sleep(0.05)
    return server, thread


@pytest.fixture(scope="module")
def service():
    """`GET /imagine` like sd_py.serve's ingress: same validation (4xx with a JSON detail), images
    from an sd_py pipeline on the fixture model."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    from sd_py import StableDiffusionPipeline
    from sd_py.serve import BadRequest, validate_request

    pipe = StableDiffusionPipeline.from_pretrained(str(SD2))
    app = FastAPI()

    @app.get("/imagine")
    def imagine(prompt: str = "", img_size: int = 768, steps: Optional[int] = None, seed: Optional[int] = None):
        try:
            r = validate_request(prompt, img_size, seed, steps)
        except BadRequest as e:
            return JSONResponse({"detail": str(e)}, status_code=422)
        image = pipe(r["prompt"], height=r["height"], width=r["width"], num_inference_steps=r["steps"], generator=r["seed"]).images[0]
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return Response(buf.getvalue(), media_type="image/png")

    port = free_port()
    server, thread = _serve_in_thread(app, port)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def ui(service):
    spec = importlib.util.spec_from_file_location("gradio_app", DEPLOY / "gradio_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = {k: os.environ.get(k) for k in ("SERVICE_NAME", "MODEL_ENDPOINT", "IMG_SIZE")}
    os.environ.update({"SERVICE_NAME": service, "MODEL_ENDPOINT": "/imagine", "IMG_SIZE": "64"})
    demo = module.build_demo()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}", module
    finally:
        demo.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/ci/test-python.sh does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _output_image_size(page, timeout_ms=120_000):
    """Waits for the output image and returns its natural size."""
    img = page.locator("img[src*='file=']").first
    img.wait_for(state="visible", timeout=timeout_ms)
    page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle(), timeout=timeout_ms)
    return img.evaluate("(el) => [el.naturalWidth, el.naturalHeight]")


def test_prompt_click_image(ui, browser, tmp_path):
    url, _ = ui
    page = browser.new_page()
    try:
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_label("Enter the Prompt").fill("a red cube on a table")
        page.get_by_label("Steps (empty: service default)").fill("3")
        page.get_by_role("button", name="Generate").click()
        assert _output_image_size(page) == [64, 64]
        page.screenshot(path=str(tmp_path / "ui-image.png"))
        # No error toast.
        assert page.get_by_text("The image service answered").count() == 0
    finally:
        page.close()


def test_service_error_is_shown(ui, browser, tmp_path):
    """An invalid request: the service's own message appears in the UI."""
    url, _ = ui
    page = browser.new_page()
    try:
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_label("Enter the Prompt").fill("a red cube")
        page.get_by_label("Image size (px, multiple of 8)").fill("100")
        page.get_by_role("button", name="Generate").click()
        message = page.get_by_text("img_size must be a multiple of 8 between 64 and 2048, got 100")
        message.first.wait_for(state="visible", timeout=60_000)
        assert page.get_by_text("HTTP 422").count() >= 1
        page.wait_for_timeout(500)
        page.screenshot(path=str(tmp_path / "ui-error.png"))
        assert page.locator("img[src*='file=']").count() == 0
    finally:
        page.close()


def test_unreachable_service_is_shown(ui, browser):
    url, _ = ui
    closed = f"http://127.0.0.1:{free_port()}"
    os.environ["SERVICE_NAME"] = closed
    page = browser.new_page()
    try:
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_label("Enter the Prompt").fill("a red cube")
        page.get_by_role("button", name="Generate").click()
        page.get_by_text(f"Cannot reach the image service at {closed}/imagine").first.wait_for(state="visible", timeout=60_000)
    finally:
        page.close()


def test_generate_image_function(service, monkeypatch):
    """The UI's handler alone: image on success, gr.Error with the service's message otherwise."""
    import gradio as gr

    spec = importlib.util.spec_from_file_location("gradio_app_fn", DEPLOY / "gradio_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("SERVICE_NAME", service)
    monkeypatch.delenv("MODEL_ENDPOINT", raising=False)
    assert module.service_url() == f"{service}/imagine"
    assert module.TIMEOUT_S == 180
    image = module.generate_image("a cat", 64, 2, 5)
    assert image.size == (64, 64)
    with pytest.raises(gr.Error, match="prompt parameter cannot be empty"):
        module.generate_image("", 64)
    monkeypatch.setenv("MODEL_ENDPOINT", "/nowhere")
    with pytest.raises(gr.Error, match="HTTP 404"):
        module.generate_image("a cat", 64)


def test_chromium_is_debians():
    assert shutil.which("chromium") or os.path.exists(CHROMIUM)
