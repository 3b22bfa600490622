//! Every write of the CLI to stdout goes through here ([`outln!`], [`out!`], [`Out`]), so that a failing
//! stdout never panics: a closed pipe (`rime inspect X --json | head -c1`) ends the program quietly with
//! status 0 (the reader wanted no more; the output files were already complete), any other write error
//! (`> /dev/full`) prints `error: writing to stdout: ...` on stderr and exits with status 1.

use std::io::Write;

/// stdout as a [`Write`] whose errors end the program as the module says (for `writeln!` and buffered writers).
pub struct Out;

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().write(buf).or_else(|e| fail(e))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush().or_else(|e| fail(e))
    }
}

/// End the program for a failed write to stdout: quietly (status 0) on a closed pipe, else with a message
/// (status 1).
pub fn fail(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    let _ = writeln!(std::io::stderr(), "error: writing to stdout: {e}");
    std::process::exit(1)
}

/// Write formatted text to stdout (see the module).
pub fn write_fmt(args: std::fmt::Arguments) {
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        fail(e)
    }
}

/// Flush stdout (at the end of `main`: text without a final newline is still in the buffer).
pub fn flush() {
    if let Err(e) = std::io::stdout().flush() {
        fail(e)
    }
}

/// `println!` that never panics (see the module).
macro_rules! outln {
    () => {
        $crate::out::write_fmt(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that never panics (see the module).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write_fmt(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: a closed or full stderr loses the message, nothing else.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
