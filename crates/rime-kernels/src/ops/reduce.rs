//! Launchers for shaders/reduce.wgsl (sums over the last axis and over rows), and the row-kernel machinery
//! shared by the row-wise families (reduce, softmax, norm, cross_entropy): the [`RowVariant`] that decides
//! how a workgroup combines the partial results of one row.

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, expect_nonempty, index_u32};
use crate::{Device, Dispatch, Spec, Tensor};

const FILE: &str = "reduce.wgsl";

/// How a row kernel's workgroup reduces one row.
///
/// lavapipe runs a workgroup's invocations as SIMD lanes and pays a coroutine switch per barrier, so on a CPU
/// adapter a row is handled by exactly one subgroup and combined with `subgroupAdd`/`subgroupMax` (no
/// barriers). Discrete GPUs use a wider workgroup and a shared-memory tree, which needs no subgroup support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowVariant {
    /// Workgroup of exactly one subgroup of this many lanes; needs SUBGROUP and a fixed subgroup size.
    Lanes(u32),
    /// Workgroup of this many invocations (a power of two), reduced through workgroup memory.
    Shared(u32),
}

const LANES_PRELUDE: &str = r#"
fn row_sum(v: f32, lid: u32) -> f32 { return subgroupAdd(v); }
fn row_max(v: f32, lid: u32) -> f32 { return subgroupMax(v); }
"#;

const SHARED_PRELUDE: &str = r#"
var<workgroup> row_red: array<f32, WG>;
fn row_sum(v: f32, lid: u32) -> f32 {
    row_red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) { row_red[lid] = row_red[lid] + row_red[lid + s]; }
        workgroupBarrier();
    }
    let r = row_red[0];
    workgroupBarrier();
    return r;
}
fn row_max(v: f32, lid: u32) -> f32 {
    row_red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) { row_red[lid] = max(row_red[lid], row_red[lid + s]); }
        workgroupBarrier();
    }
    let r = row_red[0];
    workgroupBarrier();
    return r;
}
"#;

const SCALAR_PRELUDE: &str = r#"
alias V = f32;
alias U = u32;
fn lane_index(i: u32) -> U { return i; }
fn hsum(v: V) -> f32 { return v; }
fn hmax(v: V) -> f32 { return v; }
"#;

const VEC4_PRELUDE: &str = r#"
alias V = vec4<f32>;
alias U = vec4<u32>;
fn lane_index(i: u32) -> U { return vec4<u32>(4u * i) + vec4<u32>(0u, 1u, 2u, 3u); }
fn hsum(v: V) -> f32 { return (v.x + v.y) + (v.z + v.w); }
fn hmax(v: V) -> f32 { return max(max(v.x, v.y), max(v.z, v.w)); }
"#;

impl RowVariant {
    /// Lanes on a CPU adapter with a fixed subgroup size, otherwise a shared-memory tree.
    pub fn for_device(dev: &Device) -> Self {
        let info = dev.info();
        let sg = info.subgroup_min_size;
        let fixed = sg == info.subgroup_max_size && sg.is_power_of_two() && (4..=128).contains(&sg);
        if dev.is_cpu() && dev.has_subgroups() && fixed {
            RowVariant::Lanes(sg)
        } else if dev.is_cpu() {
            RowVariant::Shared(8)
        } else {
            RowVariant::Shared(256)
        }
    }

    /// Invocations per workgroup.
    pub fn wg(self) -> u32 {
        match self {
            RowVariant::Lanes(n) | RowVariant::Shared(n) => n,
        }
    }

    /// The specialization with f32 elements (prelude defining `row_sum`/`row_max`, and the WG constant).
    pub fn spec(self) -> Spec {
        self.spec_w(1)
    }

    /// The specialization for `width` elements per load (1 or 4): the prelude also defines the element type
    /// V (f32 or vec4<f32>), its u32 twin U, `lane_index(i)` (element indices of vector i), `hsum` / `hmax`
    /// (across the components).
    pub(crate) fn spec_w(self, width: u32) -> Spec {
        let reduce = match self {
            RowVariant::Lanes(_) => LANES_PRELUDE,
            RowVariant::Shared(_) => SHARED_PRELUDE,
        };
        let elem = if width == 4 { VEC4_PRELUDE } else { SCALAR_PRELUDE };
        Spec::new().prelude(reduce).prelude(elem).constant("WG", self.wg() as f64)
    }

    /// Every variant the launchers may pick, for the validation test.
    pub(crate) fn declared() -> Vec<RowVariant> {
        vec![RowVariant::Lanes(8), RowVariant::Lanes(32), RowVariant::Shared(8), RowVariant::Shared(256)]
    }

    /// Refuse a variant this device cannot run.
    pub(crate) fn check(self, op: &'static str, dev: &Device) -> Result<()> {
        let n = self.wg();
        if !n.is_power_of_two() || n > dev.limits().max_compute_invocations_per_workgroup {
            return Err(shape_err(
                op,
                format!("{self:?}: workgroup size must be a power of two within the adapter's limit"),
            ));
        }
        if let RowVariant::Lanes(_) = self {
            let info = dev.info();
            if !dev.has_subgroups() || info.subgroup_min_size != n || info.subgroup_max_size != n {
                return Err(shape_err(
                    op,
                    format!(
                        "{self:?} needs SUBGROUP with a fixed subgroup size of {n} (adapter: {}..{})",
                        info.subgroup_min_size, info.subgroup_max_size
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The specializations of a row-kernel shader file (f32 and vec4 elements).
pub(crate) fn row_specs(file: &'static str) -> Vec<(&'static str, Spec)> {
    RowVariant::declared().into_iter().flat_map(|v| [(file, v.spec_w(1)), (file, v.spec_w(4))]).collect()
}

/// Elements per load for rows of `n`: vec4 when it divides (about twice as fast on lavapipe).
pub(crate) fn width_for(n: usize) -> u32 {
    if n & 3 == 0 {
        4
    } else {
        1
    }
}

pub fn specs() -> Vec<(&'static str, Spec)> {
    row_specs(FILE)
}

/// out \[rows] = sum (or mean) of x [.., N] over its last axis.
pub fn sum_forward(dev: &Device, out: &Tensor, x: &Tensor, mean: bool) -> Result<Vec<Dispatch>> {
    sum_forward_with(dev, RowVariant::for_device(dev), out, x, mean)
}

/// [`sum_forward`] with an explicit row variant.
pub fn sum_forward_with(dev: &Device, v: RowVariant, out: &Tensor, x: &Tensor, mean: bool) -> Result<Vec<Dispatch>> {
    const OP: &str = "sum_forward";
    v.check(OP, dev)?;
    expect_f32(OP, "x", x)?;
    expect_f32(OP, "out", out)?;
    expect_nonempty(OP, "x", x)?;
    if out.numel() != x.rows() {
        return Err(shape_err(
            OP,
            format!("out {:?} must hold {} values, one per row of x {:?}", out.shape, x.rows(), x.shape),
        ));
    }
    let rows = index_u32(OP, "rows", x.rows())?;
    let n = index_u32(OP, "N", x.last_dim())?;
    index_u32(OP, "numel", x.numel())?;
    let width = width_for(n as usize);
    let w = words(&[rows, n, mean as u32, n / width]);
    Ok(vec![dev.dispatch(FILE, OP, &v.spec_w(width), Some(&w), &[(1, x), (2, out)], grid_1d(rows))?])
}

/// out \[N] (+)= sum (or mean) of x [.., N] over all rows; `accumulate` adds to out instead of overwriting.
pub fn sum_rows_forward(dev: &Device, out: &Tensor, x: &Tensor, mean: bool, accumulate: bool) -> Result<Vec<Dispatch>> {
    sum_rows_forward_with(dev, RowVariant::for_device(dev), out, x, mean, accumulate)
}

/// [`sum_rows_forward`] with an explicit row variant (it sets the workgroup size).
pub fn sum_rows_forward_with(
    dev: &Device,
    v: RowVariant,
    out: &Tensor,
    x: &Tensor,
    mean: bool,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "sum_rows_forward";
    v.check(OP, dev)?;
    expect_f32(OP, "x", x)?;
    expect_f32(OP, "out", out)?;
    expect_nonempty(OP, "x", x)?;
    if out.numel() != x.last_dim() {
        return Err(shape_err(
            OP,
            format!("out {:?} must hold {} values (last dim of x {:?})", out.shape, x.last_dim(), x.shape),
        ));
    }
    let rows = index_u32(OP, "rows", x.rows())?;
    let n = index_u32(OP, "N", x.last_dim())?;
    index_u32(OP, "numel", x.numel())?;
    let flags = mean as u32 | (accumulate as u32) << 1;
    let width = width_for(n as usize);
    let w = words(&[rows, n, flags, n / width]);
    let groups = grid_1d((n / width).div_ceil(v.wg()));
    Ok(vec![dev.dispatch(FILE, OP, &v.spec_w(width), Some(&w), &[(1, x), (3, out)], groups)?])
}
