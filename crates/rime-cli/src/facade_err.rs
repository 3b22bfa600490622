//! The facade's errors in the CLI's words: an argument named by the library (`batch_size`) is printed as the
//! flag that sets it (`--batch-size`).

/// `rime::Error` with [`rime::Error::Invalid`]'s argument spelled as this command's flag.
pub fn flagged(e: rime::Error) -> Box<dyn std::error::Error> {
    match e {
        rime::Error::Invalid { argument, message } => format!("--{}: {message}", argument.replace('_', "-")).into(),
        e => Box::new(e),
    }
}
