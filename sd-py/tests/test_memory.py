"""An absurd image count is a ValueError raised before anything is allocated, not an abort."""

import pytest


def test_a_billion_images_are_a_value_error(pipe):
    with pytest.raises(ValueError, match="1000000000 images .* SD_MAX_IMAGES_PER_RUN"):
        pipe("a cat", height=64, width=64, num_inference_steps=1, num_images_per_prompt=10**9)
