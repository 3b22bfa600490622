//! The prelude of one shaders/qmatmul.wgsl specialization, generated at run time by the launcher
//! (ops/qmatmul.rs) for one GGUF block type and one row tile: `deq8` for the type, then the register-tiled
//! bodies `qmm_forward` and `qmm_backward` with TM rows written out (lavapipe keeps private arrays that loops
//! index in memory, so every accumulator is a scalar WGSL variable).
//!
//! `head32(rb, k0)` reads what values k0..k0+32 of the row whose blocks start at byte `rb` share (scales,
//! offsets, high bits) and `vals8(rb, k0, g, head)` returns values k0 + 8g..k0 + 8g + 8, with the f32 operations
//! of ggml's `dequantize_row_*` (and of rime-io's and the reference's copies) in the same order; `deq8(rb, k)`
//! is the two for any multiple of 8.

use crate::qtensor::QType;

/// Columns (rows of W) per invocation of the forward body.
pub(crate) const FORWARD_COLS: usize = 4;
/// k values per invocation of the backward body (two `deq8`).
pub(crate) const BACKWARD_K: usize = 16;

/// The generated prelude for `qtype` and `tm` rows per invocation; `subgroup`: `fetch_x` shares x through
/// subgroupBroadcast (8-lane subgroups, one per workgroup).
pub(crate) fn prelude(qtype: QType, tm: usize, subgroup: bool) -> String {
    let mut s = String::new();
    s.push_str(fetch_x(subgroup));
    s.push_str(dequant(qtype));
    s.push_str(DEQ8);
    forward(&mut s, tm);
    backward(&mut s, tm);
    s
}

/// x values k0..k0+32 of the row starting at element `base`, as eight vec4. With 8-lane subgroups lane l loads
/// one vec4 and subgroupBroadcast (constant lanes, hence spelled out) hands all eight to every lane (the lanes of
/// a workgroup share their rows); without, each lane loads all eight. Only the subgroup flavour mentions
/// subgroups (a module that did would not build on adapters without them).
fn fetch_x(subgroup: bool) -> &'static str {
    if subgroup {
        "fn fetch_x(base: u32, k0: u32, lane: u32) -> array<vec4<f32>, 8> {
    let v = x4[(base + k0 + 4u * lane) >> 2u];
    return array<vec4<f32>, 8>(subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u),
        subgroupBroadcast(v, 3u), subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u),
        subgroupBroadcast(v, 7u));
}
"
    } else {
        "fn fetch_x(base: u32, k0: u32, lane: u32) -> array<vec4<f32>, 8> {
    let i = (base + k0) >> 2u;
    return array<vec4<f32>, 8>(x4[i], x4[i + 1u], x4[i + 2u], x4[i + 3u], x4[i + 4u], x4[i + 5u], x4[i + 6u],
        x4[i + 7u]);
}
"
    }
}

/// The type's `head32(rb, k0)` (what values k0..k0+32 share: scales, offsets, high bits; k0 a multiple of 32)
/// and `vals8(rb, k0, g, h)` (values k0 + 8g..k0 + 8g + 8 from that head). Each value is computed with ggml's
/// f32 operations in ggml's order.
fn dequant(qtype: QType) -> &'static str {
    match qtype {
        // y = q * d
        QType::Q8_0 => {
            "fn head32(rb: u32, k0: u32) -> H32 {
    let base = rb + (k0 >> 5u) * 34u;
    return H32(qf16(base), 0.0, base, 0u);
}
fn vals8(rb: u32, k0: u32, g: u32, h: H32) -> V8 {
    let w = qbytes8(h.base + 2u + 8u * g);
    return V8(sbytes(w.x) * h.d, sbytes(w.y) * h.d);
}
"
        }
        // y = (nibble - 8) * d; values 0..16 are the low nibbles of qs[0..16], values 16..32 the high nibbles.
        QType::Q4_0 => {
            "fn head32(rb: u32, k0: u32) -> H32 {
    let base = rb + (k0 >> 5u) * 18u;
    return H32(qf16(base), 0.0, base, 0u);
}
fn vals8(rb: u32, k0: u32, g: u32, h: H32) -> V8 {
    let w = qbytes8(h.base + 2u + 8u * (g & 1u));
    let sh = (g >> 1u) * 4u;
    let lo = (w.x >> sh) & 0x0f0f0f0fu;
    let hi = (w.y >> sh) & 0x0f0f0f0fu;
    return V8((ubytes(lo) - 8.0) * h.d, (ubytes(hi) - 8.0) * h.d);
}
"
        }
        // y = nibble * d + m
        QType::Q4_1 => {
            "fn head32(rb: u32, k0: u32) -> H32 {
    let base = rb + (k0 >> 5u) * 20u;
    return H32(qf16(base), qf16(base + 2u), base, 0u);
}
fn vals8(rb: u32, k0: u32, g: u32, h: H32) -> V8 {
    let w = qbytes8(h.base + 4u + 8u * (g & 1u));
    let sh = (g >> 1u) * 4u;
    let lo = (w.x >> sh) & 0x0f0f0f0fu;
    let hi = (w.y >> sh) & 0x0f0f0f0fu;
    return V8(ubytes(lo) * h.d + h.m, ubytes(hi) * h.d + h.m);
}
"
        }
        // y = ((nibble | bit j of qh << 4) - 16) * d (qh in the head's x)
        QType::Q5_0 => {
            "fn head32(rb: u32, k0: u32) -> H32 {
    let base = rb + (k0 >> 5u) * 22u;
    return H32(qf16(base), 0.0, base, qbytes4(base + 2u));
}
fn vals8(rb: u32, k0: u32, g: u32, h: H32) -> V8 {
    let hb = vec4<u32>(h.x >> (8u * g));
    let w = qbytes8(h.base + 6u + 8u * (g & 1u));
    let sh = (g >> 1u) * 4u;
    let lo = (w.x >> sh) & 0x0f0f0f0fu;
    let hi = (w.y >> sh) & 0x0f0f0f0fu;
    let h0 = vec4<f32>(((hb >> vec4<u32>(0u, 1u, 2u, 3u)) & vec4<u32>(1u)) * 16u);
    let h1 = vec4<f32>(((hb >> vec4<u32>(4u, 5u, 6u, 7u)) & vec4<u32>(1u)) * 16u);
    return V8((ubytes(lo) + h0 - 16.0) * h.d, (ubytes(hi) + h1 - 16.0) * h.d);
}
"
        }
        // Sub-block s = (k0 % 256) / 32 of a 256-value block: y = (d * sc) * nibble - dmin * mn, the nibbles of
        // qs[32 * (s / 2)..][..32], low for even s, high for odd (the head's x: the shift, base: those 32 bytes, which
        // are 4-aligned as every 144-byte block is).
        QType::Q4K => {
            "fn head32(rb: u32, k0: u32) -> H32 {
    let base = rb + (k0 >> 8u) * 144u;
    let s = (k0 & 255u) >> 5u;
    let dm = unpack2x16float(q[base >> 2u]);
    let sm = scale_min_k4(base + 4u, s);
    return H32(dm.x * f32(sm.x), dm.y * f32(sm.y), base + 16u + (s >> 1u) * 32u, (s & 1u) * 4u);
}
fn vals8(rb: u32, k0: u32, g: u32, h: H32) -> V8 {
    let i = (h.base >> 2u) + 2u * g;
    let lo = (q[i] >> h.x) & 0x0f0f0f0fu;
    let hi = (q[i + 1u] >> h.x) & 0x0f0f0f0fu;
    return V8(h.d * ubytes(lo) - h.m, h.d * ubytes(hi) - h.m);
}
"
        }
        // Half hf (128 values) of a 256-value block, quarter qd (32 values), l = 0..32 inside it:
        // y = (d * sc) * (q6 - 32), q6 = the nibble of ql[64hf + l + 32(qd & 1)] (high for qd >= 2) | 2 bits of
        // qh[32hf + l] at 2qd, sc = scales[8hf + l / 16 + 2qd] (i8): d * sc for l < 16 in d, l >= 16 in m.
        QType::Q6K => {
            "fn head32(rb: u32, k0: u32) -> H32 {
    let base = rb + (k0 >> 8u) * 210u;
    let e = k0 & 255u;
    let hf = e >> 7u;
    let qd = (e >> 5u) & 3u;
    let sb = base + 192u + hf * 8u + 2u * qd;
    let d = qf16(base + 208u);
    let s0 = f32(bitcast<i32>(qbyte(sb) << 24u) >> 24u);
    let s1 = f32(bitcast<i32>(qbyte(sb + 1u) << 24u) >> 24u);
    return H32(d * s0, d * s1, base, 0u);
}
fn vals8(rb: u32, k0: u32, g: u32, h: H32) -> V8 {
    let e = k0 & 255u;
    let hf = e >> 7u;
    let qd = (e >> 5u) & 3u;
    let l = 8u * g;
    let ql = qbytes8(h.base + hf * 64u + l + (qd & 1u) * 32u);
    let nsh = (qd >> 1u) * 4u;
    let qh = qbytes8(h.base + 128u + hf * 32u + l);
    let hsh = 2u * qd;
    let a = ((ql.x >> nsh) & 0x0f0f0f0fu) | (((qh.x >> hsh) & 0x03030303u) << 4u);
    let b = ((ql.y >> nsh) & 0x0f0f0f0fu) | (((qh.y >> hsh) & 0x03030303u) << 4u);
    let ds = select(h.d, h.m, g >= 2u);
    return V8(ds * (ubytes(a) - 32.0), ds * (ubytes(b) - 32.0));
}
"
        }
    }
}

/// `deq8(rb, k)`: values k..k+8 (k a multiple of 8) through the head of their 32-value group.
const DEQ8: &str = "fn deq8(rb: u32, k: u32) -> V8 {
    let k0 = k & ~31u;
    return vals8(rb, k0, (k - k0) >> 3u, head32(rb, k0));
}
";

/// Appends one line of WGSL.
fn line(s: &mut String, l: &str) {
    s.push_str(l);
    s.push('\n');
}

/// `qmm_forward`: TM rows x [`FORWARD_COLS`] columns of y, k in steps of 32 (K is a whole number of 32-value
/// blocks): `fetch_x` gives each row's 32 x values (eight vec4), then four `deq8` per column, accumulators
/// `a{r}_{c}` as vec4 summed at the end. No early return: every lane takes part in `fetch_x`'s broadcasts
/// (columns past N are clamped on load and skipped on store).
fn forward(s: &mut String, tm: usize) {
    let tn = FORWARD_COLS;
    line(s, "fn qmm_forward(wid: vec3<u32>, lane: u32) {");
    line(s, &format!("    let n0 = (wid.x * WG + lane) * {tn}u;"));
    line(s, &format!("    let m0 = wid.y * {tm}u;"));
    for c in 0..tn {
        line(s, &format!("    let wb{c} = min(n0 + {c}u, p.n - 1u) * p.row_bytes;"));
    }
    for r in 0..tm {
        line(s, &format!("    let xr{r} = min(m0 + {r}u, p.m - 1u) * p.k;"));
    }
    for r in 0..tm {
        let vars: Vec<String> = (0..tn).map(|c| format!("var a{r}_{c} = vec4<f32>(0.0);")).collect();
        line(s, &format!("    {}", vars.join(" ")));
    }
    line(s, "    for (var k0 = 0u; k0 < p.k; k0 += 32u) {");
    for r in 0..tm {
        line(s, &format!("        let x{r} = fetch_x(xr{r}, k0, lane);"));
    }
    for c in 0..tn {
        line(s, &format!("        let h{c} = head32(wb{c}, k0);"));
    }
    for g in 0..4 {
        line(s, "        {");
        for c in 0..tn {
            line(s, &format!("          let w{c} = vals8(wb{c}, k0, {g}u, h{c});"));
        }
        for r in 0..tm {
            let fmas: Vec<String> = (0..tn)
                .map(|c| {
                    format!("a{r}_{c} = fma(x{r}[{}], w{c}.b, fma(x{r}[{}], w{c}.a, a{r}_{c}));", 2 * g + 1, 2 * g)
                })
                .collect();
            line(s, &format!("          {}", fmas.join(" ")));
        }
        line(s, "        }");
    }
    line(s, "    }");
    for r in 0..tm {
        for c in 0..tn {
            line(s, &format!("    store_y(m0 + {r}u, n0 + {c}u, hsum(a{r}_{c}));"));
        }
    }
    line(s, "}");
}

/// `qmm_backward`: TM rows x [`BACKWARD_K`] values of dx, n in steps of 1 (two `deq8` of W's row n, one load
/// of dY per row), accumulators `a{r}_{i}` (vec4 i of the 16 values).
fn backward(s: &mut String, tm: usize) {
    line(s, "fn qmm_backward(wid: vec3<u32>, lane: u32) {");
    line(s, &format!("    let k0 = (wid.x * WG + lane) * {BACKWARD_K}u;"));
    line(s, "    if (k0 >= p.k) { return; }");
    line(s, &format!("    let m0 = wid.y * {tm}u;"));
    line(s, "    let kh = k0 & ~31u;\n    let g0 = (k0 - kh) >> 3u;");
    for r in 0..tm {
        line(s, &format!("    let dr{r} = min(m0 + {r}u, p.m - 1u) * p.n;"));
    }
    for r in 0..tm {
        let vars: Vec<String> = (0..4).map(|i| format!("var a{r}_{i} = vec4<f32>(0.0);")).collect();
        line(s, &format!("    {}", vars.join(" ")));
    }
    line(s, "    for (var n = 0u; n < p.n; n++) {");
    line(s, "        let wb = n * p.row_bytes;");
    line(s, "        let h = head32(wb, kh);");
    line(s, "        let w0 = vals8(wb, kh, g0, h); let w1 = vals8(wb, kh, g0 + 1u, h);");
    for r in 0..tm {
        line(s, &format!("        {{ let g = vec4<f32>(dy[dr{r} + n]);"));
        line(
            s,
            &format!(
                "          a{r}_0 = fma(g, w0.a, a{r}_0); a{r}_1 = fma(g, w0.b, a{r}_1); \
                 a{r}_2 = fma(g, w1.a, a{r}_2); a{r}_3 = fma(g, w1.b, a{r}_3); }}"
            ),
        );
    }
    line(s, "    }");
    for r in 0..tm {
        line(s, &format!("    store_dx(m0 + {r}u, k0, a{r}_0, a{r}_1, a{r}_2, a{r}_3);"));
    }
    line(s, "}");
}
