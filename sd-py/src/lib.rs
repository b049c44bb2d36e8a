//! Python bindings for sd-core: placeholder until the `sd_py` work lands.
