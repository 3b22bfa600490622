//! End-to-end tests of the facade crate `rime`, on the real models (`scripts/fetch-models.sh`) and the golden
//! files of `../shared/golden`. One test binary: the modules share one GPU.

mod bad_models;
mod common;
mod decoder;
mod encoder;
mod errors;
mod kernels;
mod merge;
mod vision;
