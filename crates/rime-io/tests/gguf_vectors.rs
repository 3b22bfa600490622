//! Every GGUF block dequantizer against vectors made by llama.cpp's `gguf` Python package
//! (`scripts/gguf_quant_vectors.py`, fixtures in tests/data/gguf_quants): raw blocks from `gguf.quants.quantize`
//! (Q8_0, Q4_0, Q4_1, Q5_0) or random valid blocks (Q4_K, Q6_K), and `gguf.quants.dequantize`'s f32 values.
//! Both sides do the same f32 operations in the same order (an f16 scale widened, products and sums of exact
//! small integers and f32 scales), so the comparison is bit for bit.

use rime_io::gguf::dequantize;
use rime_io::GgmlType;
use std::path::PathBuf;

fn data(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf_quants").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e} (made by scripts/gguf_quant_vectors.py)", p.display()))
}

fn check(ty: GgmlType, name: &str) {
    let blocks = data(&format!("{name}.blocks"));
    let want: Vec<f32> =
        data(&format!("{name}.f32")).chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let (bs, bb) = ty.block().unwrap();
    assert_eq!(blocks.len() / bb * bs, want.len(), "{name}: fixture sizes disagree");
    assert!(ty.is_supported(), "{name} is not listed as supported");
    let got = dequantize(ty, &blocks, want.len()).unwrap_or_else(|| panic!("{name}: dequantize refused"));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{name}: value {i} (block {}): rime {g}, gguf-py {w}", i / bs);
    }
    // A byte count that is not whole blocks of `numel` values is refused.
    assert!(dequantize(ty, &blocks[..blocks.len() - 1], want.len()).is_none());
}

#[test]
fn q8_0_matches_gguf_py() {
    check(GgmlType::Q8_0, "Q8_0");
}

#[test]
fn q4_0_matches_gguf_py() {
    check(GgmlType::Q4_0, "Q4_0");
}

#[test]
fn q4_1_matches_gguf_py() {
    check(GgmlType::Q4_1, "Q4_1");
}

#[test]
fn q5_0_matches_gguf_py() {
    check(GgmlType::Q5_0, "Q5_0");
}

#[test]
fn q4_k_matches_gguf_py() {
    check(GgmlType::Q4K, "Q4_K");
}

#[test]
fn q6_k_matches_gguf_py() {
    check(GgmlType::Q6K, "Q6_K");
}
