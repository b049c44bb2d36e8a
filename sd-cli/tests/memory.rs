//! An absurd `--num-images` is refused with exit code 1 and one line, not an allocator abort.

mod support;

use support::*;

#[test]
fn a_billion_images_are_refused() {
    let model = pipelines().join("sd2-tiny");
    let args = ["--height", "64", "--width", "64", "--num-images", "1000000000"];
    let err = expect_error(&model, &args);
    assert!(err.contains("1000000000 images"), "{err}");
    assert!(err.contains("SD_MAX_IMAGES_PER_RUN"), "{err}");
}
