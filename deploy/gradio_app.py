"""Gradio web UI for the Stable Diffusion service (the blueprint's gradio-app-stable-diffusion.py).

It calls the service over HTTP, `GET {SERVICE_NAME}{MODEL_ENDPOINT}?prompt=...`, with a 180 s
timeout, and shows the PNG it answers. When the service fails, the UI shows the service's own
message (`gr.Error`) instead of a placeholder image.

Environment:
- `SERVICE_NAME`: base URL of the service (default `http://localhost:8000`);
- `MODEL_ENDPOINT`: path of the endpoint (default `/imagine`);
- `IMG_SIZE`: the image size the UI starts with (default 768, SD 2.1's native size);
- `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`: where the UI listens (default 0.0.0.0:7860).

Needs only gradio, requests and pillow (not sd_py): run it with `python gradio_app.py`, or build it
into the blueprint's gradio-ui image with `--build-arg GRADIO_APP="gradio_app.py"`.
"""

import html
import io
import os
from typing import Any, Optional

import gradio as gr
import requests
from PIL import Image

TIMEOUT_S = 180


def service_url() -> str:
    service_name = os.environ.get("SERVICE_NAME", "http://localhost:8000")
    model_endpoint = os.environ.get("MODEL_ENDPOINT", "/imagine")
    return f"{service_name.rstrip('/')}{model_endpoint}"


def _service_message(response: requests.Response) -> str:
    """The service's explanation of a failed request: FastAPI's JSON `detail`, else the text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail: Any = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI's validation errors: [{"loc": [...], "msg": ...}, ...]
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" if isinstance(d, dict) else str(d) for d in detail
        )
    text = str(detail) if detail else response.text.strip()
    return text[:500] or response.reason or "no details"


def _optional_int(value: Any) -> Optional[int]:
    if value is None or str(value).strip() == "":
        return None
    try:
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise gr.Error(f"Not a whole number: {html.escape(str(value))}", duration=None) from None


def generate_image(prompt: str, img_size: Any = None, steps: Any = None, seed: Any = None) -> Image.Image:
    """Asks the service for an image; raises gr.Error (shown in the UI) when that fails."""
    url = service_url()
    params = {"prompt": prompt or ""}
    for name, value in (("img_size", img_size), ("steps", steps), ("seed", seed)):
        number = _optional_int(value)
        if number is not None:
            params[name] = number
    try:
        response = requests.get(url, params=params, timeout=TIMEOUT_S)
    except requests.exceptions.Timeout:
        raise gr.Error(f"The image service at {html.escape(url)} did not answer within {TIMEOUT_S} s.", duration=None) from None
    except requests.exceptions.RequestException as e:
        raise gr.Error(f"Cannot reach the image service at {html.escape(url)}: {html.escape(type(e).__name__)}", duration=None) from None
    if response.status_code != 200:
        raise gr.Error(
            f"The image service answered HTTP {response.status_code}: {html.escape(_service_message(response))}",
            title="Image generation failed",
            duration=None,
        )
    try:
        image = Image.open(io.BytesIO(response.content))
        image.load()
    except Exception:
        raise gr.Error("The image service answered something that is not an image.", duration=None) from None
    return image


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="Stable Diffusion") as demo:
        gr.Markdown("# Stable Diffusion\nText to image, served by Ray Serve.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Enter the Prompt", placeholder="a photograph of an astronaut riding a horse")
                with gr.Row():
                    img_size = gr.Number(label="Image size (px, multiple of 8)", value=int(os.environ.get("IMG_SIZE", "768")), precision=0)
                    # Text boxes, so that "empty" (service default, random seed) stays distinct from 0.
                    steps = gr.Textbox(label="Steps (empty: service default)", value="")
                    seed = gr.Textbox(label="Seed (empty: random)", value="")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = gr.Image(label="Image", type="pil", format="png")
        inputs = [prompt, img_size, steps, seed]
        button.click(generate_image, inputs=inputs, outputs=image)
        prompt.submit(generate_image, inputs=inputs, outputs=image)
    return demo


if __name__ == "__main__":
    build_demo().launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
