// dtype conversion between f32 compute tensors and packed f16/bf16 storage (two elements per u32 word).
// One invocation per 32-bit word of the packed side.

struct Params { n: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src_packed: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst_f32: array<f32>;
@group(0) @binding(3) var<storage, read> src_f32: array<f32>;
@group(0) @binding(4) var<storage, read_write> dst_packed: array<u32>;

override WG: u32 = 64u;

fn word_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_group(wid, nwg) * WG + lid;
}

@compute @workgroup_size(WG)
fn convert_f16_to_f32_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let w = word_index(wid, nwg, lid);
    let i = 2u * w;
    if (i >= p.n) { return; }
    let v = unpack2x16float(src_packed[w]);
    dst_f32[i] = v.x;
    if (i + 1u < p.n) { dst_f32[i + 1u] = v.y; }
}

@compute @workgroup_size(WG)
fn convert_bf16_to_f32_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) lid: u32) {
    let w = word_index(wid, nwg, lid);
    let i = 2u * w;
    if (i >= p.n) { return; }
    let word = src_packed[w];
    dst_f32[i] = bitcast<f32>(word << 16u);
    if (i + 1u < p.n) { dst_f32[i + 1u] = bitcast<f32>(word & 0xffff0000u); }
}

@compute @workgroup_size(WG)
fn convert_f32_to_f16_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let w = word_index(wid, nwg, lid);
    let i = 2u * w;
    if (i >= p.n) { return; }
    var hi = 0.0;
    if (i + 1u < p.n) { hi = src_f32[i + 1u]; }
    dst_packed[w] = pack2x16float(vec2<f32>(src_f32[i], hi));
}

// Round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays NaN.
fn f32_to_bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u) { return (b >> 16u) | 0x40u; }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

@compute @workgroup_size(WG)
fn convert_f32_to_bf16_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) lid: u32) {
    let w = word_index(wid, nwg, lid);
    let i = 2u * w;
    if (i >= p.n) { return; }
    var hi = 0u;
    if (i + 1u < p.n) { hi = f32_to_bf16_bits(src_f32[i + 1u]); }
    dst_packed[w] = f32_to_bf16_bits(src_f32[i]) | (hi << 16u);
}
