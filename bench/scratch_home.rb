# frozen_string_literal: true

require "fileutils"
require "tmpdir"

# The benchmarks run in a scratch MICROSANDBOX_HOME, deleted when the script exits, so
# they leave no sandbox, image or file in the user's home (they used to leave their
# stopped sandboxes and pulled images there). The runtime is installed into the scratch
# home from the kernel package already cached in the user's home when there is one (no
# download). `BENCH_HOME=dir` runs in `dir` instead and keeps it.
module BenchScratchHome
  module_function

  # @return [String] the home the benchmark uses, with the runtime installed
  def setup!
    kept = ENV.fetch("BENCH_HOME", "")
    unless kept.empty?
      ENV["MICROSANDBOX_HOME"] = File.expand_path(kept)
      Microsandbox.install
      return ENV["MICROSANDBOX_HOME"]
    end

    user_home = Microsandbox.home
    deb = Dir[File.join(user_home, "cache", "linux-image-*.deb")].max_by { |f| File.mtime(f) }
    ENV["MICROSANDBOX_KERNEL_DEB"] = deb if deb && ENV.fetch("MICROSANDBOX_KERNEL_DEB", "").empty?
    dir = Dir.mktmpdir("msb-bench-home")
    ENV["MICROSANDBOX_HOME"] = dir
    owner = Process.pid
    # Sandboxes created here are owned by this process: they die with it. Their files go
    # with the scratch home.
    at_exit { FileUtils.rm_rf(dir) if Process.pid == owner }
    # Now, outside every timing (the first create would otherwise install it).
    Microsandbox.install
    dir
  end
end
