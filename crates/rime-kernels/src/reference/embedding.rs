//! CPU reference for shaders/embedding.wgsl. table [v, c] as f32 values.

pub fn embedding_forward(ids: &[u32], table: &[f32], c: usize) -> Vec<f32> {
    embedding_forward_offset(ids, table, c, 0)
}

/// The lookup in a table holding rows `offset..offset + v` of a larger vocabulary: zero rows elsewhere.
pub fn embedding_forward_offset(ids: &[u32], table: &[f32], c: usize, offset: u32) -> Vec<f32> {
    let v = table.len() / c;
    ids.iter()
        .flat_map(|&id| {
            let id = if id >= offset { (id - offset) as usize } else { usize::MAX };
            (0..c).map(move |j| if id < v { table[id * c + j] } else { 0.0 })
        })
        .collect()
}

/// dtable after adding the scatter of dout into `prev` (zeros when not accumulating).
pub fn embedding_backward(dout: &[f32], ids: &[u32], prev: &[f32], c: usize) -> Vec<f32> {
    let v = prev.len() / c;
    let mut d = prev.to_vec();
    for (i, &id) in ids.iter().enumerate() {
        if (id as usize) < v {
            for j in 0..c {
                d[id as usize * c + j] += dout[i * c + j];
            }
        }
    }
    d
}
