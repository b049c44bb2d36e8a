"""Fuzzing the Serve app's request parsing (issue 14): GET /imagine query strings and the
multipart bodies of POST /img2img and /inpaint, through the real FastAPI app without Ray (the
replica lookup of the class-based routes is pointed at a stand-in whose model answers a fixed PNG).

Every answer must be 200 with a PNG or 4xx with a JSON `detail`; never 5xx or an exception. What
reaches the model must be a valid request. The validators (`validate_request`,
`validate_edit_request`, `decode_upload`) are also fuzzed directly with values of any Python type:
they may raise `BadRequest` only. Cases come from a seeded generator (the same on every run);
`SD_FUZZ_CASES=N` runs N times as many. A failure prints the case and saves its `repr` to
`$SD_FUZZ_FAILURES` (default: `sd-fuzz-failures` in the temporary folder) to turn into a
regression test."""

import io
import math
import os
import random
import struct
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, List
import urllib.parse
import zlib

import pytest

CASES = max(1, int(os.environ.get("SD_FUZZ_CASES", "1") or 1))

# Values that parameters get wrong: not numbers, out of range, non-finite, huge, odd digits.
JUNK = [
    "", " ", "0", "1", "-1", "3", "8", "64", "65", "768", "2048", "2056", "1e3", "768.0", "0x40",
    "\u0666\u0664", "\uff16\uff14", " 64 ", "6_4", "nan", "NaN", "inf", "-inf", "1e309", "50",
    "50.0000001", "-0.0", "0.5", "1.0", "1.5", str(2**63), str(2**64), str(2**64 - 1),
    "99999999999999999999999999", "true", "null", "[1]", "\x00", "9" * 5000, "\ud7ff", "%",
]
PIECES = ["a cat", " ", "\t\n", "\x00", "\x7f", "e\u0301", "\U0001f408", "\u200b", "\U0010ffff",
          "<|endoftext|>", "!!", "\ufffd", "%", "&", "=", "+", "#"]


def _text(rng: random.Random) -> str:
    parts = [rng.choice(PIECES) if rng.random() < 0.8 else chr(rng.randrange(0x20, 0xD7FF)) for _ in range(rng.randrange(12))]
    if rng.random() < 0.03:
        parts = ["a "] * 10_000  # 20k characters
    return "".join(parts)


def _query_value(rng: random.Random) -> str:
    """A percent-encoded value: junk, text, or raw bytes (invalid UTF-8 included)."""
    kind = rng.randrange(4)
    if kind == 0:
        return urllib.parse.quote(rng.choice(JUNK), safe="")
    if kind == 1:
        return urllib.parse.quote(_text(rng), safe="")
    if kind == 2:
        return "".join(f"%{b:02X}" for b in rng.randbytes(rng.randrange(1, 8)))
    return rng.choice(["", "%", "%G0", "%0", "+", "a=b", "%00"])


def _imagine_query(rng: random.Random) -> str:
    names = ["prompt", "img_size", "seed", "steps", "guidance_scale", "negative_prompt", "junk"]
    parts = []
    if rng.random() < 0.8:
        parts.append("prompt=" + urllib.parse.quote(_text(rng) or "x", safe=""))
    for _ in range(rng.randrange(5)):
        name = rng.choice(names)
        parts.append(name if rng.random() < 0.05 else f"{name}={_query_value(rng)}")
    rng.shuffle(parts)
    # Under the test client's URL limit (64 KiB); a cut may leave a broken %-escape, also an input.
    return "&".join(parts)[:32_000]


def _png(size, mode="RGB", fmt="PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    try:
        Image.new(mode, size).save(buf, fmt)
    except (OSError, ValueError, KeyError):  # a mode the format cannot hold (CMYK as PNG, I;16 as
        buf = io.BytesIO()  # GIF): that mode as TIFF, which holds them all
        Image.new(mode, size).save(buf, "TIFF")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` and has no pixel data (a decompression bomb's
    header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _image_bytes(rng: random.Random, size) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:
        return _png(size)
    if kind == 1:
        return _png(size, rng.choice(["RGBA", "L", "P", "1", "I;16", "CMYK"]) if rng.random() < 0.5 else "RGB",
                    rng.choice(["PNG", "BMP", "WEBP", "TIFF", "GIF"]) if rng.random() < 0.5 else "PNG")
    if kind == 2:
        data = bytearray(_png(size))
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 3:
        data = _png(size, fmt=rng.choice(["PNG", "JPEG", "BMP", "WEBP"]))
        return data[: rng.randrange(len(data))]
    if kind == 4:
        return _png_header_only(rng.choice([0, 1, 8, 5000, 60000, 2**31 - 1]), rng.choice([1, 64, 60000]))
    if kind == 5:
        return rng.randbytes(rng.randrange(64))
    if kind == 6:
        return b""
    if kind == 7:
        return _png(rng.choice([(1, 1), (7, 64), (8, 8), (2049, 8), (64, 4000)]))
    return _png(size, fmt="JPEG")


def _edit_request(rng: random.Random):
    """(path, keyword arguments of TestClient.post) of a random /img2img or /inpaint request."""
    path = rng.choice(["/img2img", "/inpaint"])
    if rng.random() < 0.1:  # not a (valid) multipart body at all
        content_type = rng.choice(["multipart/form-data", "multipart/form-data; boundary=x",
                                   "application/json", "application/x-www-form-urlencoded", "text/plain", ""])
        return path, {"content": rng.randbytes(rng.randrange(200)), "headers": {"content-type": content_type}}
    size = rng.choice([(64, 64), (75, 61), (8, 8), (128, 72)])
    data, files = {}, {}
    if rng.random() < 0.9:
        data["prompt"] = _text(rng) if rng.random() < 0.7 else rng.choice(JUNK)
    for field in ["strength", "seed", "steps", "guidance_scale", "negative_prompt"]:
        if rng.random() < 0.4:
            data[field] = rng.choice(JUNK) if rng.random() < 0.8 else _text(rng)
    for field, mode_size in [("image", size), ("mask", size if rng.random() < 0.7 else (size[1], size[0]))]:
        roll = rng.random()
        if roll < 0.8:
            files[field] = ("f.png", _image_bytes(rng, mode_size), "image/png")
        elif roll < 0.9:
            data[field] = rng.choice(JUNK)
    if rng.random() < 0.05:  # a text field sent as a file
        files[rng.choice(["prompt", "strength", "seed"])] = ("x.txt", b"0.5", "text/plain")
    return path, {"data": data, "files": files or None}


def _check_request(request) -> None:
    """What the ingress may pass to the model: the validated, normalised request."""
    assert isinstance(request["prompt"], str) and request["prompt"].strip()
    assert isinstance(request["steps"], int) and 1 <= request["steps"]
    assert isinstance(request["guidance_scale"], float) and math.isfinite(request["guidance_scale"])
    assert isinstance(request["seed"], int) and 0 <= request["seed"] < 2**64
    assert request["height"] % 8 == 0 and request["width"] % 8 == 0 and request["height"] >= 8
    assert isinstance(request.get("sampler", ""), str)
    assert "lora" not in request and "lora_scale" not in request  # no SD_LORAS here: none is valid
    if "strength" in request:
        assert 0.0 < request["strength"] <= 1.0
        if request["mask"] is not None:
            assert request["mask"].size == request["image"].size


@pytest.fixture()
def client(monkeypatch):
    """The Serve app's FastAPI app with its class-based routes bound to a stand-in ingress whose
    model checks the request and answers a fixed PNG."""
    import ray.serve
    from fastapi.testclient import TestClient

    import sd_py.serve as s

    invalid = []

    async def model(request):
        try:
            _check_request(request)
        except AssertionError:
            invalid.append(request)
        return b"\x89PNG\r\n\x1a\nfake"

    ingress = s.APIIngress.func_or_class

    class Standin:
        handle = types.SimpleNamespace(generate_png=types.SimpleNamespace(remote=model),
                                       edit_png=types.SimpleNamespace(remote=model))
        _edit = ingress._edit
        _edit_request = ingress._edit_request
        _answer_png = ingress._answer_png

    # Ray's class-based view looks the instance up with serve.get_replica_context().
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=Standin()))
    with TestClient(s.app, raise_server_exceptions=False) as c:
        c.invalid_requests = invalid
        yield c


def _check_response(response, case: str) -> None:
    status = response.status_code
    if status == 200:
        assert response.headers["content-type"] == "image/png", case
        assert response.headers["x-seed"].isdigit(), case
        return
    assert 400 <= status < 500, f"{status} {response.text[:300]}\n  case: {case}"
    detail = response.json().get("detail")
    assert detail, f"{status} without a JSON detail\n  case: {case}"


def _save_failure(target: str, case: int, request: Any) -> str:
    """Writes the failing input's `repr` whole (the report cuts it) and returns where."""
    folder = Path(os.environ.get("SD_FUZZ_FAILURES") or Path(tempfile.gettempdir()) / "sd-fuzz-failures")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{target.replace(' ', '_')}-case{case}.txt"
    path.write_text(repr(request))
    return str(path)


def _fuzz(target: str, cases: int, make, send, client) -> None:
    rng = random.Random(target)
    for case in range(cases * CASES):
        request = make(rng)
        try:
            response = send(request)
            _check_response(response, f"case {case}: {request!r:.3000}")
        except Exception as e:  # the app raised instead of answering, or a wrong answer
            saved = _save_failure(target, case, request)
            pytest.fail(f"case {case}: {type(e).__name__}: {e}\n  input (saved to {saved}): {request!r:.3000}")
    assert not client.invalid_requests, f"invalid requests reached the model: {client.invalid_requests[:3]!r:.3000}"
    print(f"fuzz {target}: {cases * CASES} cases, 0 failures", file=sys.stderr)


def test_fuzz_imagine_queries(client):
    _fuzz("serve imagine", 500, _imagine_query, lambda query: client.get("/imagine?" + query), client)


def test_fuzz_edit_bodies(client):
    _fuzz("serve edit", 200, _edit_request, lambda req: client.post(req[0], **req[1]), client)


@pytest.mark.parametrize(
    "query",
    [
        "prompt=%FF%FE&img_size=64",  # invalid UTF-8 becomes U+FFFD, a prompt like any other
        "prompt=a%00b&img_size=64&negative_prompt=%ED%A0%80",  # NUL; an encoded lone surrogate
        "prompt=cat&img_size=64&steps=%FF",
        "prompt=cat&img_size=%D9%A6%D9%A4",  # Arabic-Indic digits "64"
        "prompt=cat&guidance_scale=1e309",
        "prompt=cat&seed=18446744073709551616",
    ],
)
def test_imagine_odd_bytes(client, query):
    _check_response(client.get("/imagine?" + query), query)
    assert not client.invalid_requests


# ---- the validators called directly (the model deployment's `generate(prompt, img_size,
# **params)` takes whatever a Python caller sends, not only what HTTP parsing gives) ----

ANY_VALUES: List[Any] = [
    None, True, False, 0, 1, -1, 7, 8, 64, 768, 2048, 2**63, 2**64, -(2**64), 10**400,
    0.0, -0.0, 0.5, 64.0, 64.5, 1e308, float("inf"), float("-inf"), float("nan"),
    "", " ", "64", " 64 ", "64.0", "1e3", "nan", "-inf", "9" * 5000, "\ud800", "a\x00b", "\U0010ffff",
    b"64", b"\xff", bytearray(b"1"), [], [64], {}, {"a": 1}, (1,), {1}, object(), 1j,
]


def _any_value(rng: random.Random) -> Any:
    return rng.choice(ANY_VALUES) if rng.random() < 0.8 else _text(rng)


def _direct_fuzz(target: str, cases: int, make: Callable[[random.Random], Any], call: Callable[[Any], Any]) -> None:
    """`call` on `cases * SD_FUZZ_CASES` inputs: it returns a request that `_check_request` accepts
    or raises `BadRequest` (413 or 422) with a message; any other exception fails with the input."""
    import sd_py.serve as s

    rng = random.Random(target)
    outcomes = {"accepted": 0, "refused": 0}
    for case in range(cases * CASES):
        args = make(rng)
        try:
            try:
                request = call(args)
            except s.BadRequest as e:
                assert str(e) and e.status_code in (413, 422), f"BadRequest {e.status_code} {e!r}"
                outcomes["refused"] += 1
                continue
            _check_request(request)
            outcomes["accepted"] += 1
        except Exception as e:
            saved = _save_failure(target, case, args)
            pytest.fail(f"case {case}: {type(e).__name__}: {e}\n  input (saved to {saved}): {args!r:.3000}")
    print(f"fuzz {target}: {cases * CASES} cases, 0 failures ({outcomes})", file=sys.stderr)


def test_fuzz_validate_request():
    from sd_py.serve import validate_request

    def make(rng: random.Random) -> dict:
        args = {"prompt": _text(rng) or "x" if rng.random() < 0.6 else _any_value(rng)}
        for name in ["img_size", "seed", "steps", "guidance_scale", "negative_prompt", "lora", "lora_scale"]:
            if rng.random() < 0.5:
                args[name] = _any_value(rng)
        return args

    _direct_fuzz("validate_request", 2000, make, lambda args: validate_request(**args))


def test_fuzz_validate_edit_request():
    from PIL import Image

    from sd_py.serve import validate_edit_request

    sizes = [(0, 0), (1, 1), (7, 64), (8, 8), (64, 64), (75, 61), (2048, 8), (2049, 8), (8, 2056)]

    def make(rng: random.Random) -> dict:
        size = rng.choice(sizes)
        args = {"prompt": _text(rng) or "x" if rng.random() < 0.6 else _any_value(rng), "size": size}
        if rng.random() < 0.5:
            args["mask"] = size if rng.random() < 0.8 else rng.choice(sizes)
        for name in ["strength", "seed", "steps", "guidance_scale", "negative_prompt", "sampler", "lora", "lora_scale"]:
            if rng.random() < 0.5:
                args[name] = _any_value(rng)
        return args

    def call(args: dict) -> Any:
        fields = dict(args)
        image = Image.new("RGB", fields.pop("size"))
        mask = Image.new("L", fields.pop("mask")) if "mask" in fields else None
        return validate_edit_request(image=image, mask=mask, **fields)

    _direct_fuzz("validate_edit_request", 1000, make, call)


def test_fuzz_decode_upload():
    from sd_py.serve import decode_upload

    sizes = [(64, 64), (75, 61), (1, 1), (8, 3000)]

    def make(rng: random.Random) -> tuple:
        return rng.choice(["RGB", "L"]), _image_bytes(rng, rng.choice(sizes))

    def call(args: tuple) -> Any:
        image = decode_upload("image", args[1], args[0])
        assert image.mode == args[0] and image.width * image.height > 0, image
        return validate_request_for(image)

    def validate_request_for(image: Any) -> Any:
        from sd_py.serve import validate_edit_request

        return validate_edit_request("a cat", image, seed=1)

    _direct_fuzz("decode_upload", 300, make, call)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(img_size=float("inf")),  # int(inf) raised OverflowError
        dict(img_size=64.5),  # was truncated to 64
        dict(steps=float("-inf")),
        dict(seed=float("nan")),
        dict(guidance_scale=10**400),  # float(10**400) raised OverflowError
        dict(negative_prompt=["dog"]),  # reached the model as a list
        dict(negative_prompt="\ud800"),  # a lone surrogate cannot be encoded for sd_py
        dict(prompt="a \udfff cat"),
        dict(prompt=b"a cat"),
    ],
)
def test_validator_regressions(kwargs):
    """Inputs the direct fuzzing found raising other exceptions (or accepted): now `BadRequest`."""
    from sd_py.serve import BadRequest, validate_request

    args = {"prompt": "a cat", "img_size": 64, **kwargs}
    with pytest.raises(BadRequest) as info:
        validate_request(**args)
    assert type(info.value) is BadRequest and str(info.value)
