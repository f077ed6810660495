//! Standard output for kvctl's commands. `println!` panics when the reader
//! has gone away (`kvctl nodes | head`), since Rust ignores SIGPIPE; here a
//! closed pipe ends the program quietly with success, as other Unix tools
//! do, and any other write error ends it with a message.

use std::io::Write;

/// Writes one line to standard output (see the module docs).
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("Error: cannot write to standard output: {e}");
            std::process::exit(1);
        }
    }
}

/// `println!` through [`line`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;
