//! The `bartleby` binary: everything lives in the library; see `bartleby::cli`.

fn main() -> std::process::ExitCode {
    bartleby::cli::main()
}
