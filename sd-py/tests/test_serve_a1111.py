"""sd_py.serve's AUTOMATIC1111 API without Ray: defaults, validation, response schema (info keys,
infotexts) over a fake model (the real Serve and sd-cli's image are in test_serve_ray.py)."""

import base64
import json

import pytest
from fastapi.testclient import TestClient

from sd_py import _serve_a1111 as a1111
from sd_py import serve
from serve_fakes import FakeModel, app_with, check_a1111_response, png_bytes

def test_validate_txt2img_defaults_and_seeds():
    parameters, requests = a1111.validate_txt2img({"prompt": "a cat", "seed": 10, "batch_size": 2, "n_iter": 2})
    assert [r["seed"] for r in requests] == [10, 11, 12, 13]
    assert (requests[0]["width"], requests[0]["height"], requests[0]["guidance_scale"]) == (512, 512, 7.0)
    assert parameters["steps"] == serve.DEFAULT_STEPS and parameters["seed"] == 10
    assert serve.group_requests(requests) == [[0, 1, 2, 3]]
    _, (random,) = a1111.validate_txt2img({"prompt": "a cat", "seed": -1})
    assert 0 <= random["seed"] < 2**63


def test_sampler_name_with_a1111_schedule_type():
    assert a1111.sampler_name({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}) == "DPM++ 2M Karras"
    assert a1111.sampler_name({"sampler_name": "Euler a", "scheduler": "Automatic"}) == "Euler a"
    assert a1111.sampler_name({"sampler_name": None}) is None


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "a cat", "width": 100}, "multiple of 8"),
        ({"prompt": "a cat", "batch_size": 0}, "batch_size"),
        ({"prompt": "a cat", "batch_size": 8, "n_iter": 3}, "at most 16"),
        ({"prompt": "a cat", "seed": -2}, "seed"),
        ({"prompt": "a cat", "steps": 0}, "steps"),
        ({"prompt": "a cat", "sampler_name": 3}, "sampler_name"),
        ({"prompt": "a cat", "seed": 2**64 - 1, "batch_size": 2}, "below 2"),
    ],
)
def test_validate_txt2img_refuses(body, message):
    with pytest.raises(serve.BadRequest, match=message):
        a1111.validate_txt2img(body)


def test_txt2img_route_answers_a1111_schema():
    model = FakeModel()
    client = TestClient(app_with(model))
    body = {"prompt": "a cat", "seed": 5, "batch_size": 2, "n_iter": 2, "width": 64, "height": 64, "steps": 3}
    r = client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler a", "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert r.status_code == 200, r.text
    info = check_a1111_response(r.json(), 4)
    assert info["all_seeds"] == [5, 6, 7, 8] and info["seed"] == 5
    assert info["sampler_name"] == "Euler a" and info["sd_model_hash"] == "0123abcd"
    assert "Seed: 7," in info["infotexts"][2] and "override_settings" in info["notes"][0]
    assert r.json()["parameters"]["prompt"] == "a cat"
    assert {m["sampler"] for m in model.requests} == {"Euler a"}
    # The model's sampler is read back from the infotext when none is asked.
    info = check_a1111_response(client.post("/sdapi/v1/txt2img", json=body).json(), 4)
    assert info["sampler_name"] == "DDIM"


def test_a1111_errors():
    model = FakeModel()
    client = TestClient(app_with(model))
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 0})
    assert r.status_code == 422 and set(r.json()) == {"error", "detail", "body", "errors"}
    r = client.post("/sdapi/v1/txt2img", content=b"[1]", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON object" in r.json()["detail"]
    model.fail = ValueError("unknown scheduler 'Foo'")
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "width": 64, "height": 64, "sampler_name": "Foo"})
    assert r.status_code == 422 and "unknown scheduler" in r.json()["detail"]


def test_img2img_route_decodes_and_resizes():
    model = FakeModel()
    client = TestClient(app_with(model))
    image = "data:image/png;base64," + base64.b64encode(png_bytes((75, 61))).decode()
    mask = base64.b64encode(png_bytes((75, 61), "L")).decode()
    body = {"prompt": "a cat", "init_images": [image], "mask": mask, "seed": 1, "n_iter": 2, "width": 64, "height": 64}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    info = check_a1111_response(r.json(), 2)
    assert info["denoising_strength"] == 0.75 and info["is_using_inpainting_conditioning"] is True
    assert r.json()["parameters"]["init_images"] is None
    assert model.requests[0]["image"].size == model.requests[0]["mask"].size == (64, 64)
    # Without width/height: the image's size rounded down to 8.
    r = client.post("/sdapi/v1/img2img", json={"prompt": "a cat", "init_images": [image], "denoising_strength": 0.5})
    assert r.status_code == 200 and (model.requests[-1]["width"], model.requests[-1]["height"]) == (72, 56)
    for bad, message in [([], "init_images"), (["%%%"], "base64"), ([base64.b64encode(b"x").decode()], "not an image")]:
        r = client.post("/sdapi/v1/img2img", json={"prompt": "a cat", "init_images": bad})
        assert r.status_code == 422 and message in r.json()["detail"]


def test_samplers_group_names_by_scheduler():
    names = [
        ("EulerDiscreteScheduler", "EulerDiscreteScheduler", "{}"),
        ("euler", "EulerDiscreteScheduler", "{}"),
        ("Euler", "EulerDiscreteScheduler", "{}"),
        ("euler_karras", "EulerDiscreteScheduler", '{"use_karras_sigmas": true}'),
        ("DDPMScheduler", "DDPMScheduler", "{}"),
        ("ddpm", "DDPMScheduler", "{}"),
    ]
    assert a1111.samplers(names) == [
        {"name": "Euler", "aliases": ["EulerDiscreteScheduler", "euler"], "options": {"scheduler_class": "EulerDiscreteScheduler"}},
        {"name": "euler_karras", "aliases": [], "options": {"scheduler_class": "EulerDiscreteScheduler", "use_karras_sigmas": True}},
        {"name": "ddpm", "aliases": ["DDPMScheduler"], "options": {"scheduler_class": "DDPMScheduler"}},
    ]


def test_models_and_options(monkeypatch):
    import jsonschema
    from serve_fakes import A1111_OPTIONS, A1111_SD_MODELS

    monkeypatch.setenv("MODEL_ID", "/models/sd2-tiny")
    assert a1111.sd_models()[0]["model_name"] == "sd2-tiny"
    assert a1111.options()["sd_model_checkpoint"] == "sd2-tiny"
    jsonschema.validate(a1111.sd_models(), A1111_SD_MODELS)
    jsonschema.validate(a1111.options(), A1111_OPTIONS)


def test_png_metadata_setting(monkeypatch):
    """The model's PNGs carry the `parameters` text (iTXt when not Latin-1); with
    SD_PNG_METADATA=0 (PNG_METADATA False) the answered PNGs lose that chunk only (same pixels),
    and A1111's info still has the infotexts."""
    import io

    import numpy as np
    from PIL import Image

    from sd_py import _serve_compat as compat

    image = Image.new("RGB", (8, 8), (10, 20, 30))
    image.info["parameters"] = "a cat\nSteps: 2, Seed: 1"
    png = serve._png(image)
    assert compat.png_parameters(png) == "a cat\nSteps: 2, Seed: 1" and b"tEXt" in png
    assert serve.answered_png(png) == png
    image.info["parameters"] = "一只猫\nSteps: 2"
    png = serve._png(image)
    assert b"iTXt" in png and compat.png_parameters(png) == "一只猫\nSteps: 2"
    monkeypatch.setattr(serve, "PNG_METADATA", False)
    stripped = serve.answered_png(png)
    assert b"iTXt" not in stripped and compat.png_parameters(stripped) == ""
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stripped))), np.asarray(image))

    model = FakeModel()
    r = TestClient(app_with(model)).post("/sdapi/v1/txt2img", json={"prompt": "a cat", "width": 64, "height": 64, "seed": 4})
    answer = r.json()
    assert compat.png_parameters(base64.b64decode(answer["images"][0])) == ""
    assert "Seed: 4," in json.loads(answer["info"])["infotexts"][0]


def test_json_bodies_over_the_caps_are_refused_before_decoding(monkeypatch):
    """A declared length over the cap is refused unread, and a body sent without a length stops
    being read at the cap (413 in each API's shape)."""
    monkeypatch.setattr(serve, "MAX_UPLOAD_BYTES", 1000)
    client = TestClient(app_with(FakeModel()))
    headers = {"content-type": "application/json", "content-length": str(10**12)}
    r = client.post("/sdapi/v1/img2img", content=b"{}", headers=headers)
    assert r.status_code == 413 and "over" in r.json()["detail"]

    def chunks():
        for _ in range(64):
            yield b" " * 65536

    r = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "the request body is over" in r.json()["detail"]
    r = client.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
