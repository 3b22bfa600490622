// Rotary position embedding, Hugging Face Llama "rotate_half" layout: channel i of a head pairs with channel
// i + HS/2 (not the interleaved 2i, 2i+1 layout). x [B, T, NH, HS], one invocation per pair. The inverse
// frequencies come in the uniform block, computed on the CPU the way PyTorch rounds them, so that the f32
// angle pos * inv_freq is bit-identical; the angle is reduced to [-pi, pi] before sin/cos because GPU
// sin/cos are only specified (and on some GPUs only accurate) in that range. The backward applies the
// transposed rotation (sin negated). The `_at` entry points read the position of token 0 from a u32 buffer
// instead of the uniform block, so one recorded dispatch serves every decode step (exact below 2^24).

struct Params {
    pairs: u32, t: u32, nh: u32, hs: u32,
    pos_offset: u32, _p0: u32, _p1: u32, _p2: u32,
    inv_freq: array<vec4<f32>, 64>,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> pos_buf: array<u32>;

override WG: u32 = 64u;

// 2*pi split so k * TWO_PI_HI is exact for k < 2^15 (Cody-Waite reduction).
const TWO_PI_HI: f32 = 6.28125;
const TWO_PI_LO: f32 = 0.0019353071795864769;
const INV_TWO_PI: f32 = 0.15915494309189535;

fn rotate(k: u32, sgn: f32, pos_offset: u32) {
    let half = p.hs / 2u;
    let i = k % half;
    let head = k / half;
    let t = (head / p.nh) % p.t;
    let angle = f32(pos_offset + t) * p.inv_freq[i >> 2u][i & 3u];
    let q = round(angle * INV_TWO_PI);
    let r = (angle - q * TWO_PI_HI) - q * TWO_PI_LO;
    let c = cos(r);
    let s = sgn * sin(r);
    let base = head * p.hs + i;
    let x1 = x[base];
    let x2 = x[base + half];
    out[base] = x1 * c - x2 * s;
    out[base + half] = x2 * c + x1 * s;
}

@compute @workgroup_size(WG)
fn rope_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * WG + lid;
    if (k >= p.pairs) { return; }
    rotate(k, 1.0, p.pos_offset);
}

// x = dout, out = dx.
@compute @workgroup_size(WG)
fn rope_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * WG + lid;
    if (k >= p.pairs) { return; }
    rotate(k, -1.0, p.pos_offset);
}

@compute @workgroup_size(WG)
fn rope_forward_at(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * WG + lid;
    if (k >= p.pairs) { return; }
    rotate(k, 1.0, pos_buf[0]);
}

// x = dout, out = dx.
@compute @workgroup_size(WG)
fn rope_backward_at(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * WG + lid;
    if (k >= p.pairs) { return; }
    rotate(k, -1.0, pos_buf[0]);
}
