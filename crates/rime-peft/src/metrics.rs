//! Classification metrics as scikit-learn computes them: accuracy and macro-averaged F1 (a class with no
//! predicted and no true examples contributes F1 = 0, as sklearn's zero_division=0).

pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / gold.len() as f64
}

pub fn macro_f1(pred: &[usize], gold: &[usize], num_classes: usize) -> f64 {
    if num_classes == 0 {
        return 0.0;
    }
    let mut total = 0.0;
    for c in 0..num_classes {
        let tp = pred.iter().zip(gold).filter(|(p, g)| **p == c && **g == c).count() as f64;
        let fp = pred.iter().zip(gold).filter(|(p, g)| **p == c && **g != c).count() as f64;
        let fneg = pred.iter().zip(gold).filter(|(p, g)| **p != c && **g == c).count() as f64;
        let denom = 2.0 * tp + fp + fneg;
        total += if denom > 0.0 { 2.0 * tp / denom } else { 0.0 };
    }
    total / num_classes as f64
}

/// Index of the largest value in each row of `logits` [n, k].
pub fn argmax_rows(logits: &[f32], k: usize) -> Vec<usize> {
    logits
        .chunks(k)
        .map(|row| row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn macro_f1_matches_sklearn() {
        // Per class: 0 -> tp 2, fp 1, fn 0: F1 0.8; 1 -> tp 1, fp 1, fn 1: 0.5; 2 -> tp 0: 0. Mean 1.3 / 3,
        // as sklearn.metrics.f1_score(gold, pred, average='macro').
        let gold = [0, 1, 1, 0, 2];
        let pred = [0, 1, 0, 0, 1];
        assert!((macro_f1(&pred, &gold, 3) - 1.3 / 3.0).abs() < 1e-12);
        assert!((accuracy(&pred, &gold) - 0.6).abs() < 1e-12);
        assert_eq!(argmax_rows(&[0.1, 0.9, 2.0, -1.0], 2), vec![1, 0]);
    }
}
