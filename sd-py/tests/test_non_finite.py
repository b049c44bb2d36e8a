"""NaN or inf never ends as a black image: caller-given NaN is a ValueError, a run whose values go
non-finite (here a VAE with NaN weights) a FloatingPointError naming the stage, and the Serve app
answers that with 500 and counts it toward the replica's health."""

import asyncio
import json
import shutil
import threading

import numpy as np
import pytest

from sd_py import StableDiffusionPipeline
from conftest import SD2, fill_with_nan


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(latents=np.full((1, 4, 8, 8), np.nan, dtype=np.float32)),
        dict(prompt=None, prompt_embeds=np.full((1, 77, 32), np.nan, dtype=np.float32)),
        dict(negative_prompt_embeds=np.full((1, 77, 32), np.inf, dtype=np.float32), prompt=None, prompt_embeds=np.zeros((1, 77, 32), dtype=np.float32)),
    ],
)
def test_non_finite_arguments_are_value_errors(pipe, kwargs):
    args = dict(prompt="a cat", height=64, width=64, num_inference_steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match="NaN or infinite"):
        pipe(**args)


@pytest.mark.parametrize("output_type", ["pil", "np"])
def test_nan_in_the_vae_is_a_floating_point_error(tmp_path, output_type):
    model = tmp_path / "model"
    shutil.copytree(SD2, model)
    fill_with_nan(model / "vae" / "diffusion_pytorch_model.safetensors", "decoder.conv_out.bias")
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    with pytest.raises(FloatingPointError, match=r"^non-finite values \(NaN or inf\) in the VAE decode"):
        pipe("a cat", height=64, width=64, num_inference_steps=2, output_type=output_type)


def test_serve_answers_a_non_finite_run_with_500_and_counts_it():
    pytest.importorskip("ray")
    from sd_py.serve import APIIngress, StableDiffusionV2

    model = object.__new__(StableDiffusionV2.func_or_class)  # no pipeline: only the counting
    model._stats_lock = threading.Lock()
    model.stats = {"requests": 0, "pipeline_calls": 0, "images": 0, "largest_batch": 0, "failures": 0}
    model._consecutive_failures = 0
    model._last_error = None
    message = "non-finite values (NaN or inf) in the VAE decode"

    def failing():
        raise FloatingPointError(message)

    for _ in range(model.MAX_CONSECUTIVE_FAILURES):
        with pytest.raises(FloatingPointError):
            model._counted(1, failing)
    assert model.stats["failures"] == model.MAX_CONSECUTIVE_FAILURES
    assert message in model._problem()

    async def remote(request):
        raise FloatingPointError(message)

    # `_answer_png` uses nothing of the ingress (an instance would need a Serve handle).
    answer = asyncio.run(APIIngress.func_or_class._answer_png(None, remote, {"seed": 1}))
    assert answer.status_code == 500
    assert json.loads(answer.body) == {"detail": f"image generation failed: {message}"}
