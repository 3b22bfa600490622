//! The subgroup kernels of shaders/attention.wgsl (`*_subgroup` entry points), generated for one head size
//! and appended to the subgroup specialization's prelude by the launcher (ops/attention.rs).
//!
//! lavapipe keeps a private array that a loop indexes in memory (per-lane scratch), so every per-row and per-key
//! quantity is a scalar WGSL variable, with the loops over head chunks (c), rows of a lane (r) and keys or
//! queries of a block (i) written out here.
//! Naming: row r of a lane is row r * 8 + lane of the workgroup's block; `{x}{r}_{c}` is chunk c (vec4) of the
//! row's vector x; `{y}{r}_{i}` is the lane's row r against streamed row i of the current block of 8.

/// Rows per lane of a subgroup kernel: each broadcast row then feeds that many rows of the lane. At head size 32
/// four measured fastest on lavapipe (the dK/dV kernel 2.4x the looped kernel with two rows; eight no faster
/// and far slower to compile). Wider heads keep the per-lane state (about four head vectors per row) and the
/// compile time to the same size: four rows at head size 64 ran about 12% faster than two but took about 10 s
/// more to compile the first time.
pub(crate) fn rows_per_lane(hs: usize) -> usize {
    (128 / hs).clamp(1, 4)
}

/// The subgroup specialization's generated prelude for head size `hs`: the lane-broadcast helpers `bc{i}`
/// (vec4) and `bcf{i}` (f32), then the three kernels.
pub(crate) fn subgroup_prelude(hs: usize) -> String {
    let mut pre = String::new();
    for i in 0..8 {
        pre.push_str(&format!(
            "fn bc{i}(x: vec4<f32>) -> vec4<f32> {{ return subgroupBroadcast(x, {i}u); }}\n\
             fn bcf{i}(x: f32) -> f32 {{ return subgroupBroadcast(x, {i}u); }}\n"
        ));
    }
    pre.push_str(&subgroup_kernels(hs));
    pre
}

fn subgroup_kernels(hs: usize) -> String {
    let (h4, r) = (hs / 4, rows_per_lane(hs));
    let mut s = String::new();
    gen_forward(&mut s, h4, r);
    gen_backward_query(&mut s, h4, r);
    gen_backward_key_value(&mut s, h4, r);
    s
}

/// The loop over blocks of 8 keys that the forward and the dQ kernel share (a team's rows see keys up to the
/// causal end of its last row): lane `lid` holds key `jl`, its row offset `kb` and whether the mask keeps it.
/// The caller closes the loop.
fn open_key_loop(s: &mut String, h4: usize, rb: usize) {
    w!(s, "  let jend = select(p.s, causal_end(min(t0 + {}u, p.t - 1u)), p.causal != 0u);", 8 * rb - 1);
    w!(s, "  for (var j0 = 0u; j0 < jend; j0 += 8u) {{");
    w!(s, "    let jl = min(j0 + lid, p.s - 1u);");
    w!(s, "    let kb = ((b * p.s + jl) * p.nkv + kh) * {h4}u;");
    w!(s, "    let keep = select(0.0, 1.0, key_kept(b, jl));");
}

/// Score-style sums over the 8 lanes' operands: for each 4-wide column c and lane i, broadcast lane i's
/// `src{c}` of every `(name, src)` in `bcasts` and add `dot(reg{r}_{c}, name)` into `sum{r}_{i}` for every
/// `(sum, reg, name)` in `dots` and row block r. `ind` is the indentation.
fn gen_dots(s: &mut String, ind: &str, h4: usize, rb: usize, bcasts: &[(&str, &str)], dots: &[(&str, &str, &str)]) {
    for c in 0..h4 {
        for i in 0..8 {
            let lets: Vec<String> = bcasts.iter().map(|(n, src)| format!("let {n} = bc{i}({src}{c});")).collect();
            w!(s, "{ind}{{ {}", lets.join(&format!("\n{ind}  ")));
            for r in 0..rb {
                for (sum, reg, n) in dots {
                    w!(s, "{ind}  {sum}{r}_{i} += dot({reg}{r}_{c}, {n});");
                }
            }
            w!(s, "{ind}}}");
        }
    }
}

/// Gradient-style sums: for each 4-wide column c, registers `dst{r}_{c}` += Σ_i weight{r}_{i} · (lane i's
/// `src{c}`), for every `(acc, dst, weight, name)` in `accs` (`name` one of the broadcasts in `bcasts`),
/// through local accumulators `acc{r}` so lavapipe keeps them in registers, in fma order i = 0..8.
fn gen_accumulate(
    s: &mut String,
    ind: &str,
    h4: usize,
    rb: usize,
    bcasts: &[(&str, &str)],
    accs: &[(&str, &str, &str, &str)],
) {
    for c in 0..h4 {
        w!(s, "{ind}{{");
        for r in 0..rb {
            let vars: Vec<String> = accs.iter().map(|(a, d, _, _)| format!("var {a}{r} = {d}{r}_{c};")).collect();
            w!(s, "{ind}  {}", vars.join(&format!("\n{ind}  ")));
        }
        for i in 0..8 {
            let lets: Vec<String> = bcasts.iter().map(|(n, src)| format!("let {n} = bc{i}({src}{c});")).collect();
            w!(s, "{ind}  {{ {}", lets.join(&format!("\n{ind}    ")));
            for r in 0..rb {
                for (a, _, wt, n) in accs {
                    w!(s, "{ind}    {a}{r} = fma(vec4<f32>({wt}{r}_{i}), {n}, {a}{r});");
                }
            }
            w!(s, "{ind}  }}");
        }
        for r in 0..rb {
            let sets: Vec<String> = accs.iter().map(|(a, d, _, _)| format!("{d}{r}_{c} = {a}{r};")).collect();
            w!(s, "{ind}  {}", sets.join(&format!("\n{ind}  ")));
        }
        w!(s, "{ind}}}");
    }
}

fn gen_forward(s: &mut String, h4: usize, rb: usize) {
    w!(s, "@compute @workgroup_size(8)");
    w!(s, "fn attention_forward_subgroup(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{");
    w!(s, "  let h = wid.y;\n  let b = wid.z;\n  let t0 = wid.x * {}u;", 8 * rb);
    w!(s, "  let kh = h / (p.nh / p.nkv);\n  let scale = bitcast<f32>(p.scale_bits);");
    for r in 0..rb {
        w!(s, "  let tc{r} = min(t0 + {}u + lid, p.t - 1u);", 8 * r);
        w!(s, "  let qb{r} = ((b * p.t + tc{r}) * p.nh + h) * {h4}u;");
        for c in 0..h4 {
            w!(s, "  let q{r}_{c} = q[qb{r} + {c}u] * scale;");
            w!(s, "  var o{r}_{c} = vec4<f32>(0.0);");
        }
        w!(s, "  let me{r} = select(p.s, causal_end(tc{r}), p.causal != 0u);");
        w!(s, "  var m{r} = NEG_BIG;\n  var l{r} = 0.0;");
    }
    open_key_loop(s, h4, rb);
    for c in 0..h4 {
        w!(s, "    let k{c} = k[kb + {c}u];");
    }
    for r in 0..rb {
        for i in 0..8 {
            w!(s, "    var a{r}_{i} = 0.0;");
        }
    }
    gen_dots(s, "    ", h4, rb, &[("kk", "k")], &[("a", "q", "kk")]);
    for i in 0..8 {
        w!(s, "    let ok{i} = bcf{i}(keep) != 0.0;");
    }
    for r in 0..rb {
        w!(s, "    var bm{r} = m{r};");
        for i in 0..8 {
            w!(s, "    let s{r}_{i} = select(NEG_BIG, a{r}_{i}, ok{i} && j0 + {i}u < me{r});");
            w!(s, "    bm{r} = max(bm{r}, s{r}_{i});");
        }
        w!(s, "    let corr{r} = exp(m{r} - bm{r});");
        w!(s, "    var l{r}n = l{r} * corr{r};");
        for i in 0..8 {
            // `!(s <= NEG_BIG)`, not `s > NEG_BIG`: a NaN score is kept (and makes the row NaN), only masked keys drop.
            w!(s, "    let e{r}_{i} = select(0.0, exp(s{r}_{i} - bm{r}), !(s{r}_{i} <= NEG_BIG));");
            w!(s, "    l{r}n += e{r}_{i};");
        }
        w!(s, "    l{r} = l{r}n;\n    m{r} = bm{r};");
    }
    for c in 0..h4 {
        w!(s, "    {{ let vc = v[kb + {c}u];");
        for r in 0..rb {
            w!(s, "      var acc{r} = o{r}_{c} * corr{r};");
        }
        for i in 0..8 {
            w!(s, "      {{ let vv = bc{i}(vc);");
            for r in 0..rb {
                w!(s, "        acc{r} = fma(vec4<f32>(e{r}_{i}), vv, acc{r});");
            }
            w!(s, "      }}");
        }
        for r in 0..rb {
            w!(s, "      o{r}_{c} = acc{r};");
        }
        w!(s, "    }}");
    }
    w!(s, "  }}");
    for r in 0..rb {
        w!(s, "  if (t0 + {}u + lid < p.t) {{", 8 * r);
        // only an exact 0 (no visible key) gives 0; a NaN sum stays NaN
        w!(s, "    let inv = select(1.0 / l{r}, 0.0, l{r} == 0.0);");
        for c in 0..h4 {
            w!(s, "    out[qb{r} + {c}u] = o{r}_{c} * inv;");
        }
        w!(s, "    lse[(b * p.nh + h) * p.t + tc{r}] = select(m{r} + log(l{r}), bitcast<f32>(p.neg_inf_bits), l{r} == 0.0);");
        w!(s, "  }}");
    }
    w!(s, "}}");
}

fn gen_backward_query(s: &mut String, h4: usize, rb: usize) {
    w!(s, "@compute @workgroup_size(8)");
    w!(s, "fn attention_backward_query_subgroup(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{");
    w!(s, "  let h = wid.y;\n  let b = wid.z;\n  let t0 = wid.x * {}u;", 8 * rb);
    w!(s, "  let kh = h / (p.nh / p.nkv);\n  let scale = bitcast<f32>(p.scale_bits);");
    for r in 0..rb {
        w!(s, "  let tc{r} = min(t0 + {}u + lid, p.t - 1u);", 8 * r);
        w!(s, "  let qb{r} = ((b * p.t + tc{r}) * p.nh + h) * {h4}u;");
        w!(s, "  var d{r} = 0.0;");
        for c in 0..h4 {
            w!(s, "  let q{r}_{c} = q[qb{r} + {c}u] * scale;");
            w!(s, "  let do{r}_{c} = dout[qb{r} + {c}u];");
            w!(s, "  d{r} += dot(do{r}_{c}, out_in[qb{r} + {c}u]);");
            w!(s, "  var g{r}_{c} = vec4<f32>(0.0);");
        }
        w!(s, "  let row{r} = (b * p.nh + h) * p.t + tc{r};");
        w!(s, "  let ls{r} = lse_in[row{r}];");
        w!(s, "  if (t0 + {}u + lid < p.t) {{ delta[row{r}] = d{r}; }}", 8 * r);
        w!(s, "  let me{r} = select(p.s, causal_end(tc{r}), p.causal != 0u);");
    }
    open_key_loop(s, h4, rb);
    for c in 0..h4 {
        w!(s, "    let k{c} = k[kb + {c}u];\n    let v{c} = v[kb + {c}u];");
    }
    for r in 0..rb {
        for i in 0..8 {
            w!(s, "    var s{r}_{i} = 0.0;\n    var p{r}_{i} = 0.0;");
        }
    }
    gen_dots(s, "    ", h4, rb, &[("kk", "k"), ("vv", "v")], &[("s", "q", "kk"), ("p", "do", "vv")]);
    // A visible key implies the row saw at least one key, so its lse is finite wherever it is used.
    for i in 0..8 {
        w!(s, "    let ok{i} = bcf{i}(keep) != 0.0;");
    }
    for r in 0..rb {
        for i in 0..8 {
            w!(
                s,
                "    let ds{r}_{i} = select(0.0, exp(s{r}_{i} - ls{r}), ok{i} && j0 + {i}u < me{r}) * (p{r}_{i} - d{r});"
            );
        }
    }
    gen_accumulate(s, "    ", h4, rb, &[("kk", "k")], &[("acc", "g", "ds", "kk")]);
    w!(s, "  }}");
    for r in 0..rb {
        w!(s, "  if (t0 + {}u + lid < p.t) {{", 8 * r);
        for c in 0..h4 {
            w!(s, "    dq[qb{r} + {c}u] = g{r}_{c} * scale;");
        }
        w!(s, "  }}");
    }
    w!(s, "}}");
}

fn gen_backward_key_value(s: &mut String, h4: usize, rb: usize) {
    w!(s, "@compute @workgroup_size(8)");
    w!(s, "fn attention_backward_key_value_subgroup(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{");
    w!(s, "  let kh = wid.y;\n  let b = wid.z;\n  let j0 = wid.x * {}u;", 8 * rb);
    w!(s, "  let group = p.nh / p.nkv;\n  let scale = bitcast<f32>(p.scale_bits);");
    for r in 0..rb {
        w!(s, "  let jc{r} = min(j0 + {}u + lid, p.s - 1u);", 8 * r);
        w!(s, "  let kb{r} = ((b * p.s + jc{r}) * p.nkv + kh) * {h4}u;");
        for c in 0..h4 {
            w!(s, "  let k{r}_{c} = k[kb{r} + {c}u] * scale;\n  let v{r}_{c} = v[kb{r} + {c}u];");
            w!(s, "  var gk{r}_{c} = vec4<f32>(0.0);\n  var gv{r}_{c} = vec4<f32>(0.0);");
        }
        w!(s, "  let kept{r} = key_kept(b, jc{r});");
        // Causal: query t sees key j iff t >= j + T - S.
        w!(s, "  let ms{r} = select(0u, u32(clamp(i32(jc{r}) + i32(p.t) - i32(p.s), 0, i32(p.t))), p.causal != 0u);");
    }
    w!(s, "  let tstart = select(0u, u32(clamp(i32(j0) + i32(p.t) - i32(p.s), 0, i32(p.t))), p.causal != 0u);");
    w!(s, "  for (var hh = 0u; hh < group; hh++) {{");
    w!(s, "    let h = kh * group + hh;");
    w!(s, "    for (var t0 = tstart; t0 < p.t; t0 += 8u) {{");
    w!(s, "      let tl = min(t0 + lid, p.t - 1u);");
    w!(s, "      let qb = ((b * p.t + tl) * p.nh + h) * {h4}u;");
    w!(s, "      let row = (b * p.nh + h) * p.t + tl;");
    w!(s, "      let lse_l = lse_in[row];\n      let d_l = delta_in[row];");
    for c in 0..h4 {
        w!(s, "      let q{c} = q[qb + {c}u];\n      let o{c} = dout[qb + {c}u];");
    }
    for r in 0..rb {
        for i in 0..8 {
            w!(s, "      var s{r}_{i} = 0.0;\n      var p{r}_{i} = 0.0;");
        }
    }
    gen_dots(s, "      ", h4, rb, &[("qq", "q"), ("oo", "o")], &[("s", "k", "qq"), ("p", "v", "oo")]);
    for i in 0..8 {
        w!(s, "      let ls{i} = bcf{i}(lse_l);\n      let dd{i} = bcf{i}(d_l);");
    }
    for r in 0..rb {
        for i in 0..8 {
            w!(s, "      let pj{r}_{i} = select(0.0, exp(s{r}_{i} - ls{i}), kept{r} && t0 + {i}u < p.t && t0 + {i}u >= ms{r});");
            w!(s, "      let ds{r}_{i} = pj{r}_{i} * (p{r}_{i} - dd{i});");
        }
    }
    gen_accumulate(
        s,
        "      ",
        h4,
        rb,
        &[("qq", "q"), ("oo", "o")],
        &[("av", "gv", "pj", "oo"), ("ak", "gk", "ds", "qq")],
    );
    w!(s, "    }}\n  }}");
    for r in 0..rb {
        w!(s, "  if (j0 + {}u + lid < p.s) {{", 8 * r);
        for c in 0..h4 {
            w!(s, "    dk[kb{r} + {c}u] = gk{r}_{c} * scale;\n    dv[kb{r} + {c}u] = gv{r}_{c};");
        }
        w!(s, "  }}");
    }
    w!(s, "}}");
}
