//! The generated functions of shaders/gemv.wgsl: `gemv_vec` and `gemv_scalar`, each a register tile of
//! GM rows (up to [`ROWS`]) by GC columns (up to [`COLS`]) written out in full. Rows r >= GM and columns
//! c >= GC sit behind `if (GM > r)` / `if (GC > 4u)` on the prelude consts, so the compiler drops them.

use super::{guard, join};

/// Rows of the largest tile (the largest GM).
const ROWS: usize = 8;
/// Columns of the largest tile (the largest GC).
const COLS: usize = 8;
/// k per iteration of gemv_vec's main loop (one `fetch_x` of 32 elements per row).
const KSTEP: usize = 32;

/// The generated functions, in file order: (name, text from `fn name(` through its closing `}` line).
pub(super) fn functions() -> Vec<(&'static str, String)> {
    vec![("gemv_vec", gemv_vec()), ("gemv_scalar", gemv_scalar())]
}

/// The clamped row offsets of x (`xr{r}`) and W (`wr{c}`), shared by both kernels.
fn offsets(s: &mut String) {
    w!(s, "    let n0 = (wid.x * WG + lane) * GC;\n    let m0 = wid.y * GM;\n    let b = wid.z;");
    for r in 0..ROWS {
        w!(s, "    let xr{r} = b * p.l_sb + min(m0 + {r}u, p.m - 1u) * p.l_sm;");
    }
    for c in 0..COLS {
        w!(s, "    let wr{c} = b * p.r_sb + min(n0 + {c}u, p.n - 1u) * p.r_sn;");
    }
}

/// The accumulators `a{r}_{c}`, one line per row.
fn accumulators(s: &mut String, zero: &str) {
    for r in 0..ROWS {
        w!(s, "    {}", join(0..COLS, " ", |c| format!("var a{r}_{c} = {zero};")));
    }
}

/// The stores of the tile, `value(r, c)` the expression stored for row r, column c.
fn stores(s: &mut String, value: impl Fn(usize, usize) -> String) {
    let store = |r: usize, c: usize| format!("store1(b, m0 + {r}u, n0 + {c}u, {});", value(r, c));
    for r in 0..ROWS {
        w!(s, "    {}", guard("GM", r));
        w!(s, "        {}", join(0..4, " ", |c| store(r, c)));
        w!(s, "        if (GC > 4u) {{ {} }}", join(4..COLS, " ", |c| store(r, c)));
        w!(s, "    }}");
    }
}

/// Eight W loads (`w{c}`), eight k from `at`.
fn load_w8(s: &mut String, ind: &str, at: &str) {
    for c in 0..COLS {
        w!(s, "{ind}let w{c} = load_rhs8(wr{c} + {at});");
    }
}

/// Row r's update by eight k: x halves `xa`, `xb` (from `xa_xb`) against every column's eight W values.
fn fma8(s: &mut String, ind: &str, r: usize, xa_xb: &str) {
    w!(s, "{ind}{}", guard("GM", r));
    w!(s, "{ind}    {xa_xb}");
    for c in 0..COLS {
        w!(s, "{ind}    a{r}_{c} = fma(xb, w{c}[1], fma(xa, w{c}[0], a{r}_{c}));");
    }
    w!(s, "{ind}}}");
}

fn gemv_vec() -> String {
    let mut s = String::new();
    w!(s, "fn gemv_vec(wid: vec3<u32>, lane: u32) {{");
    offsets(&mut s);
    accumulators(&mut s, "vec4<f32>(0.0)");
    w!(s, "    let kfull = p.k & ~{}u;", KSTEP - 1);
    w!(s, "    for (var k0 = 0u; k0 < kfull; k0 += {KSTEP}u) {{");
    for r in 0..ROWS {
        w!(s, "        let x{r} = fetch_x(xr{r}, k0, lane);");
    }
    for g in 0..KSTEP / 8 {
        w!(s, "        {{ let k = k0 + {}u;", 8 * g);
        load_w8(&mut s, "          ", "k");
        for r in 0..ROWS {
            fma8(&mut s, "          ", r, &format!("let xa = x{r}[{}]; let xb = x{r}[{}];", 2 * g, 2 * g + 1));
        }
        w!(s, "        }}");
    }
    w!(s, "    }}");
    w!(s, "    for (var k = kfull; k < p.k; k += 8u) {{");
    load_w8(&mut s, "        ", "k");
    for r in 0..ROWS {
        let x = format!("let xa = lhs4[(xr{r} + k) >> 2u]; let xb = lhs4[(xr{r} + k + 4u) >> 2u];");
        fma8(&mut s, "        ", r, &x);
    }
    w!(s, "    }}");
    stores(&mut s, |r, c| format!("hsum(a{r}_{c})"));
    w!(s, "}}");
    s
}

fn gemv_scalar() -> String {
    let mut s = String::new();
    w!(s, "fn gemv_scalar(wid: vec3<u32>, lane: u32) {{");
    offsets(&mut s);
    accumulators(&mut s, "0.0");
    w!(s, "    for (var k = 0u; k < p.k; k++) {{");
    w!(s, "        let lk = k * p.l_sk;\n        let rk = k * p.r_sk;");
    for c in 0..COLS {
        w!(s, "        let w{c} = load_rhs(wr{c} + rk);");
    }
    for r in 0..ROWS {
        let fmas = join(0..COLS, " ", |c| format!("a{r}_{c} = fma(x, w{c}, a{r}_{c});"));
        w!(s, "        {} let x = lhs[xr{r} + lk]; {fmas} }}", guard("GM", r));
    }
    w!(s, "    }}");
    stores(&mut s, |r, c| format!("a{r}_{c}"));
    w!(s, "}}");
    s
}
