fn main() {
    std::process::exit(contextpilotd::cli::main());
}
