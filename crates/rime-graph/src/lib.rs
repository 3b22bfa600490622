//! rime-graph: the layer that turns a model into GPU work.
//!
//! A [`Graph`] is a list of kernel ops over tensor ids with static shapes, built with calls that read like
//! model code (`g.linear(x, w, b)`, `g.layernorm(..)`, `g.attention(..)`, `g.lora(..)`). Parameters live in a
//! [`ParamStore`], each frozen or trainable. [`Executor`] derives the backward pass only along paths that
//! reach a trainable parameter (a frozen weight gets no gradient buffer and no weight-gradient kernel), plans
//! buffers by liveness, and records forward, backward and the optimizer update into one command encoder and
//! one submit per step.

mod error;
mod exec;
mod graph;
mod ops;
pub mod optim;
mod store;

pub use error::{Error, Result};
pub use exec::{dropout_seed, Executor, MemoryReport, StepOutput};
pub use graph::{Graph, Node, Op, Var};
pub use optim::{LrSchedule, OptimConfig, OptimKind, ParamGroup};
pub use store::{Param, ParamId, ParamStore};
