//! WGSL generators: the one way rime writes unrolled WGSL. lavapipe keeps private arrays that loops index in
//! memory, so the hot register tiles are scalar variables with every loop written out; these Rust functions
//! write them, sharing the helpers below.
//! - `attention`: the subgroup kernels, generated per head size into the specialization's prelude at run time.
//! - `qmatmul`: the block type's dequantizer and the row-tiled bodies of shaders/qmatmul.wgsl, generated per
//!   (GGUF block type, row tile) into the specialization's prelude at run time.
//! - `matmul`, `gemv`: the register-tiled functions of `shaders/matmul.wgsl` and `shaders/gemv.wgsl`. Their
//!   output is committed inside those files (so the shaders stay readable and are embedded as they are); the
//!   test `generated_functions_match_shaders` fails when a committed function differs from its generator, and
//!   `RIME_WRITE_WGSL=1 cargo test -p rime-kernels --lib generated_functions` rewrites them in place.

/// Appends one formatted line to a String (the generators' only output).
macro_rules! w {
    ($s:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        writeln!($s, $($arg)*).unwrap();
    }};
}

pub(crate) mod attention;
#[cfg(test)]
mod gemv;
#[cfg(test)]
mod matmul;
pub(crate) mod qmatmul;

/// `f(i)` for every `i` of `items`, joined by `sep`.
#[cfg(test)]
fn join<I>(items: I, sep: &str, f: impl Fn(I::Item) -> String) -> String
where
    I: IntoIterator,
{
    items.into_iter().map(f).collect::<Vec<_>>().join(sep)
}

/// The opening of row `r`'s block when only the first `{name}` rows exist: row 0 always, others behind
/// `if ({name} > r)` (a const, so the compiler drops the dead rows).
#[cfg(test)]
fn guard(name: &str, r: usize) -> String {
    if r == 0 {
        "{".to_string()
    } else {
        format!("if ({name} > {r}u) {{")
    }
}

/// `text` with the function `name` (from its `fn name(` line through the next line that is `}`) replaced by
/// `func`, which spans the same lines.
#[cfg(test)]
fn splice(text: &str, name: &str, func: &str) -> Result<String, String> {
    let open = format!("fn {name}(");
    let start =
        text.find(&format!("\n{open}")).map(|i| i + 1).ok_or_else(|| format!("no line starts with `{open}`"))?;
    let end = text[start..].find("\n}\n").map(|i| start + i + 3).ok_or_else(|| format!("`{open}` is never closed"))?;
    Ok(format!("{}{func}{}", &text[..start], &text[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shader_path(file: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shaders").join(file)
    }

    /// Each committed file with its generated functions replaced by the generators' output must be unchanged.
    /// With RIME_WRITE_WGSL=1 the regenerated files are written instead.
    #[test]
    fn generated_functions_match_shaders() {
        let write = std::env::var("RIME_WRITE_WGSL").is_ok_and(|v| v == "1");
        for (file, funcs) in [("gemv.wgsl", gemv::functions()), ("matmul.wgsl", matmul::functions())] {
            let path = shader_path(file);
            let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut text = committed.clone();
            for (name, func) in &funcs {
                text = splice(&text, name, func).unwrap_or_else(|e| panic!("{file}: {e}"));
            }
            if write {
                std::fs::write(&path, &text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            } else if text != committed {
                let line = committed.lines().zip(text.lines()).position(|(a, b)| a != b).map_or(0, |i| i + 1);
                panic!(
                    "shaders/{file} differs from its generator (src/gen/{}.rs) from line {line}: edit the generator, \
                     then rewrite the file with RIME_WRITE_WGSL=1 cargo test -p rime-kernels --lib generated_functions",
                    file.trim_end_matches(".wgsl")
                );
            }
        }
    }

    #[test]
    fn splice_replaces_one_function_and_keeps_the_rest() {
        let text = "// head\nfn a(x: u32) {\n    old;\n}\n\nfn b() {\n}\n";
        assert_eq!(
            splice(text, "a", "fn a(x: u32) {\n    new;\n}\n").unwrap(),
            "// head\nfn a(x: u32) {\n    new;\n}\n\nfn b() {\n}\n"
        );
        assert!(splice(text, "c", "").is_err());
        assert!(splice("fn a() {\n", "a", "").is_err());
    }
}
