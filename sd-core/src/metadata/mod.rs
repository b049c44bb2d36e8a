//! Generation settings stored in the images: AUTOMATIC1111's `parameters` text ("infotext"), the
//! de-facto standard that A1111, Civitai and most tools read, and the PNG text chunk that holds it.
//!
//! - [`infotext`]: the text format, written and parsed as A1111 does (`create_infotext`,
//!   `parse_generation_parameters`), plus [`GenerationInfo`], the settings of one image.
//! - [`png`]: PNGs with a `parameters` chunk (`tEXt`, or `iTXt` when not Latin-1), and reading it.

pub mod infotext;
pub mod png;

pub use infotext::{python_float, quote, unquote, GenerationInfo, Infotext};
pub use png::{encode_png, read_png_parameters, PARAMETERS_KEY};
