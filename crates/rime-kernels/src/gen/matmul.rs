//! The generated functions of shaders/matmul.wgsl: the general kernel `mm_general` (an 8x8 register tile,
//! scalar loads) and the tiled kernels `tiled_nn`, `tiled_nt`, `tiled_tn` (a lane's [`FTM`] rows by 8 columns,
//! row r in `c{r}_0`, `c{r}_1`), written out in full.

use super::join;

/// Rows (and columns) of the general kernel's tile.
const GT: usize = 8;
/// Rows per team of a tiled kernel (the shader's `FTM`).
const FTM: usize = 32;
/// Lanes of a team: the rows a `fetch_rows` returns, and `fetch_cols` returns 4 * TEAM rows.
const TEAM: usize = 8;
const LANES: [&str; 4] = ["x", "y", "z", "w"];

/// The generated functions, in file order: (name, text from `fn name(` through its closing `}` line).
pub(super) fn functions() -> Vec<(&'static str, String)> {
    vec![("mm_general", mm_general()), ("tiled_nn", tiled_nn()), ("tiled_nt", tiled_nt()), ("tiled_tn", tiled_tn())]
}

fn mm_general() -> String {
    let mut s = String::new();
    w!(s, "fn mm_general(gid: vec3<u32>) {{");
    w!(s, "    let m0 = gid.y * {GT}u;\n    let n0 = gid.x * {GT}u;\n    let b = gid.z;");
    w!(s, "    if (m0 >= p.m || n0 >= p.n || b >= p.batch) {{ return; }}");
    for r in 0..GT {
        w!(s, "    let lo{r} = b * p.l_sb + min(m0 + {r}u, p.m - 1u) * p.l_sm;");
    }
    for c in 0..GT {
        w!(s, "    let ro{c} = b * p.r_sb + min(n0 + {c}u, p.n - 1u) * p.r_sn;");
    }
    for r in 0..GT {
        w!(s, "    var c{r}0 = vec4<f32>(0.0); var c{r}1 = vec4<f32>(0.0);");
    }
    w!(s, "    for (var kb = 0u; kb < p.kb; kb++) {{");
    w!(s, "        for (var k = 0u; k < p.k; k++) {{");
    w!(s, "            let lk = kb * p.l_skb + k * p.l_sk;\n            let rk = kb * p.r_skb + k * p.r_sk;");
    for (h, cols) in [(0, 0..4), (1, 4..8)] {
        w!(s, "            let b{h} = vec4<f32>({});", join(cols, ", ", |c| format!("load_rhs(ro{c} + rk)")));
    }
    for r in 0..GT {
        w!(
            s,
            "            let a{r} = vec4<f32>(lhs[lo{r} + lk]); c{r}0 = fma(a{r}, b0, c{r}0); c{r}1 = fma(a{r}, b1, c{r}1);"
        );
    }
    w!(s, "        }}\n    }}");
    for r in 0..GT {
        w!(s, "    store8(b, m0 + {r}u, n0, c{r}0, c{r}1);");
    }
    w!(s, "}}");
    s
}

/// The head of a tiled kernel: tile origin, batch bases, then `columns` (the rhs column offsets) and the
/// accumulators.
fn tiled_head(s: &mut String, name: &str, columns: impl Fn(&mut String)) {
    w!(s, "fn {name}(wid: vec3<u32>, lane: u32) {{");
    w!(s, "    let m0 = wid.y * FTM;\n    let n0 = (wid.x * {TEAM}u + lane) * 8u;\n    let b = wid.z;");
    w!(s, "    let lbase = b * p.l_sb;\n    let rbase = b * p.r_sb;");
    columns(s);
    for r in 0..FTM {
        w!(s, "    var c{r}_0 = vec4<f32>(0.0); var c{r}_1 = vec4<f32>(0.0);");
    }
}

/// The column offsets of an N-contiguous rhs (nn, tn): two vec4 groups, clamped to the last four columns.
fn columns_n(s: &mut String) {
    w!(s, "    let c0 = rbase + min(n0, p.n - 4u);\n    let c1 = rbase + min(n0 + 4u, p.n - 4u);");
}

/// The end of a tiled kernel: close the k loop, store the tile.
fn tiled_tail(s: &mut String) {
    w!(s, "    }}");
    for r in 0..FTM {
        w!(s, "    store8v(b, m0 + {r}u, n0, c{r}_0, c{r}_1);");
    }
    w!(s, "}}");
}

/// The row updates of nn and nt: `fetch_rows` for each team block, then row r's two accumulator lines
/// (`update(r, half)`), `a` being the row's four lhs values at k..k+3.
fn row_updates(s: &mut String, update: impl Fn(usize, usize) -> String) {
    for g in 0..FTM / TEAM {
        w!(s, "        let rows{g} = fetch_rows(lbase, m0 + {}u, lane, k);", TEAM * g);
        for i in 0..TEAM {
            let r = TEAM * g + i;
            w!(s, "        {{ let a = rows{g}[{i}];");
            w!(s, "          {}\n          {} }}", update(r, 0), update(r, 1));
        }
    }
}

fn tiled_nn() -> String {
    let mut s = String::new();
    tiled_head(&mut s, "tiled_nn", columns_n);
    w!(s, "    for (var k = 0u; k < p.k; k += 4u) {{");
    for j in 0..4 {
        w!(s, "        let rk{j} = (k + {j}u) * p.r_sk;");
        w!(s, "        let b{j}_0 = rhs4_nn(c0, rk{j}, k + {j}u); let b{j}_1 = rhs4_nn(c1, rk{j}, k + {j}u);");
    }
    row_updates(&mut s, |r, h| {
        // c = fma(a.w, b3, fma(a.z, b2, fma(a.y, b1, fma(a.x, b0, c)))), k ascending inside out.
        let mut e = format!("c{r}_{h}");
        for (j, l) in LANES.iter().enumerate() {
            e = format!("fma(vec4<f32>(a.{l}), b{j}_{h}, {e})");
        }
        format!("c{r}_{h} = {e};")
    });
    tiled_tail(&mut s);
    s
}

fn tiled_nt() -> String {
    let mut s = String::new();
    tiled_head(&mut s, "tiled_nt", |s| {
        for c in 0..8 {
            w!(s, "    let cn{c} = min(n0 + {c}u, p.n - 1u);\n    let ro{c} = rbase + cn{c} * p.r_sn;");
        }
    });
    w!(s, "    for (var k = 0u; k < p.k; k += 4u) {{");
    for c in 0..8 {
        w!(s, "        let b{c} = rhs4_nt(ro{c}, cn{c}, k);");
    }
    row_updates(&mut s, |r, h| {
        format!("c{r}_{h} += vec4<f32>({});", join(4 * h..4 * h + 4, ", ", |c| format!("dot(a, b{c})")))
    });
    tiled_tail(&mut s);
    s
}

fn tiled_tn() -> String {
    let mut s = String::new();
    tiled_head(&mut s, "tiled_tn", columns_n);
    w!(s, "    for (var k = 0u; k < p.k; k++) {{");
    w!(s, "        let rk = k * p.r_sk;");
    w!(s, "        let b_0 = load_rhs4(c0 + rk); let b_1 = load_rhs4(c1 + rk);");
    w!(s, "        let cols = fetch_cols(lbase + k * p.l_sk, m0, lane);");
    for q in 0..FTM / 4 {
        w!(s, "        {{ let a = cols[{q}];");
        let lines: Vec<String> = LANES
            .iter()
            .enumerate()
            .map(|(j, l)| {
                let r = 4 * q + j;
                format!("c{r}_0 = fma(vec4<f32>(a.{l}), b_0, c{r}_0); c{r}_1 = fma(vec4<f32>(a.{l}), b_1, c{r}_1);")
            })
            .collect();
        w!(s, "          {} }}", lines.join("\n          "));
    }
    tiled_tail(&mut s);
    s
}
