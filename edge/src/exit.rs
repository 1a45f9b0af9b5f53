//! How an error reaches the person who ran a Switchyard command.

/// Errors are printed as one line of causes (`a: b: c`), without a backtrace: they are
/// for the person running the command, who needs what went wrong and what to do. A cause
/// whose text the line already holds (many errors quote their source) is not repeated.
pub fn exit_with(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, without repeats.
pub fn error_line(error: &anyhow::Error) -> String {
    error_chain(error.as_ref())
}

/// Any error and its sources on one line, without repeats (as [`error_line`]).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connecting to {addr}: {source}")]
    struct Outer {
        addr: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn causes_are_chained_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = anyhow::Error::new(Outer {
            addr: "x",
            source: io,
        })
        .context("health check");
        assert_eq!(error_line(&e), "health check: connecting to x: refused");
    }
}
