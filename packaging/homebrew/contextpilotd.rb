# Homebrew formula for contextpilotd. `brew services start contextpilotd`
# runs it at login with the configuration in the platform config dir
# (~/Library/Application Support/contextpilotd/config.toml).
class Contextpilotd < Formula
  desc "Supervises llama-server and serves it as a fast, metered OpenAI-compatible API"
  homepage "https://github.com/contextpilotd/contextpilotd"
  url "https://github.com/contextpilotd/contextpilotd/archive/refs/tags/v0.1.0.tar.gz"
  # Replace with the release tarball's checksum when tagging.
  sha256 "0000000000000000000000000000000000000000000000000000000000000000"
  license "Apache-2.0"
  head "https://github.com/contextpilotd/contextpilotd.git", branch: "main"

  depends_on "rust" => :build
  depends_on "llama.cpp"

  def install
    system "cargo", "install", *std_cargo_args
    pkgshare.install "config.example.toml"
  end

  def caveats
    <<~EOS
      Set the model in ~/Library/Application Support/contextpilotd/config.toml:
        [llama]
        model = "/path/to/model.gguf"
      (#{opt_pkgshare}/config.example.toml documents every key), then:
        brew services start contextpilotd
    EOS
  end

  service do
    run [opt_bin/"contextpilotd", "run"]
    # Like the LaunchAgent that `contextpilotd service install` writes:
    # restart after an abnormal exit only, interactive scheduling, and a PATH
    # on which Homebrew's llama-server is found.
    keep_alive successful_exit: false
    process_type :interactive
    environment_variables PATH: std_service_path_env
    # stdout and stderr catch what stops a start, and panics; the log lines go
    # to the daemon's own rotated ~/Library/Logs/contextpilotd/contextpilotd.log.
    log_path var/"log/contextpilotd.out.log"
    error_log_path var/"log/contextpilotd.err.log"
  end

  test do
    assert_match version.to_s, shell_output("#{bin}/contextpilotd --version")
    (testpath/"config.toml").write "[llama]\n"
    output = shell_output("#{bin}/contextpilotd run --config #{testpath}/config.toml 2>&1", 2)
    assert_match "no model configured", output
    assert_match "com.contextpilot.contextpilotd", shell_output("#{bin}/contextpilotd service print --launchd")
  end
end
