//! Errors as one line: each error and the causes under it, for logs and for the CLI.

use std::error::Error;
use std::fmt::Write;

/// `error: cause: its cause`, following `source()` to the bottom.
pub fn chain(error: &dyn Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let _ = write!(line, ": {e}");
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(super::chain(&e), "outer: inner");
    }
}
